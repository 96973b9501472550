"""The MSD ensemble behind the velocity interface, and its artifact (modelio layout, kind "router")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.modelio import BUILDERS, WEIGHTS, LoadedModel, fit_weights, load_weights, read_meta, save_model
from pipeline.msd.partition import check_partition
from pipeline.nets import NetSpec, build_net


class Router(nn.Module):
    """K students behind the velocity interface: each sample goes to the student that owns its class.

    owner: (num_classes,) long, owner[c] = index of the student serving class c.
    """

    owner: Tensor

    def __init__(self, students: Sequence[nn.Module], owner: Tensor) -> None:
        super().__init__()
        owner = torch.as_tensor(owner, dtype=torch.long)
        if owner.dim() != 1 or owner.numel() == 0 or owner.min() < 0 or owner.max() >= len(students):
            raise ValueError(f"owner must map every class to one of {len(students)} students, got {owner}")
        self.students = nn.ModuleList(students)
        self.register_buffer("owner", owner.clone())

    @classmethod
    def from_students(
        cls, students: Sequence[nn.Module], groups: Sequence[Sequence[int]], num_classes: int
    ) -> Router:
        """students[k] serves groups[k]; the groups must partition the classes."""
        check_partition(groups, num_classes)
        if len(groups) != len(students):
            raise ValueError(f"{len(students)} students for {len(groups)} groups")
        owner = torch.empty(num_classes, dtype=torch.long)
        for k, group in enumerate(groups):
            owner[list(group)] = k
        return cls(students, owner)

    @property
    def num_classes(self) -> int:
        return self.owner.numel()

    @property
    def groups(self) -> list[list[int]]:
        return [torch.nonzero(self.owner == k).flatten().tolist() for k in range(len(self.students))]

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """x (B,*shape), t (B,), label (B,) -> v (B,*shape) in input order; one batched call per student."""
        owner = self.owner[label]
        parts, order = [], []
        for k, student in enumerate(self.students):
            idx = torch.nonzero(owner == k).flatten()
            if idx.numel():
                parts.append(student(x[idx], t[idx], label[idx]))
                order.append(idx)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]


def _build_router(
    meta: dict[str, Any], build_student: Callable[[dict[str, Any]], nn.Module] | None = None
) -> Router:
    """Empty router from its metadata; students from `build_student(meta["net"])` (default: build_net)."""
    if build_student is None:
        shape, num_classes = tuple(meta["data_shape"]), meta["num_classes"]

        def build_student(spec: dict[str, Any]) -> nn.Module:
            return build_net(NetSpec.model_validate(spec), shape, num_classes)

    students = [build_student(meta["net"]) for _ in meta["groups"]]
    return Router.from_students(students, meta["groups"], meta["num_classes"])


BUILDERS["router"] = _build_router  # so modelio.load_model (sample, eval) loads routers like any model


def save_router(router: Router, directory: Path | str, meta: dict[str, Any]) -> None:
    """Atomic `model.pt` + `meta.json` (modelio layout); `meta` needs stage, data_shape, net (student spec).

    kind, groups and num_classes are taken from the router.
    """
    if "net" not in meta:
        raise ValueError("router meta needs 'net': the students' NetSpec as a dict")
    full = {**meta, "kind": "router", "groups": router.groups, "num_classes": router.num_classes}
    save_model(Path(directory), router, full)


def load_router(
    directory: Path | str,
    build_student: Callable[[dict[str, Any]], nn.Module] | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """A saved router (frozen, eval) and its meta; `build_student(meta["net"])` makes each empty student."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("kind") != "router":
        raise ValueError(f"{directory}: a {meta.get('kind')!r} model, not a router")
    router = _build_router(meta, build_student)
    fit_weights(router, load_weights(directory), directory / WEIGHTS)
    return LoadedModel(net=router.to(device).eval().requires_grad_(False), meta=meta)
