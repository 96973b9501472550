"""Per-student MSD objectives (docs/methods.md §5): Teacher Score Matching and Distribution Matching.

Both are loss objects `loss(net, batch, step)`. Pair terms use every class; fresh-noise terms only the
student's own classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.flow import (
    Batch,
    RectifiedFlowLoss,
    VelocityFn,
    denoise,
    expand_time,
    interpolate,
    one_step,
    sample_time,
)
from pipeline.slimflow import Distance, make_distance


def _freeze(net: nn.Module) -> nn.Module:
    return net.requires_grad_(False).eval()


def _class_tensor(classes: Sequence[int]) -> Tensor:
    if len(classes) == 0:
        raise ValueError("a student needs at least one class")
    return torch.as_tensor(list(classes), dtype=torch.long)


class TeacherScoreMatchingLoss:
    """TSM: E_t ||v_s(x_t, t) - v_T(x_t, t)||^2 on noised data x_t = t x + (1 - t) z, mean over dims.

    Only batch samples whose label is in `classes` (None: all) count; a batch with none gives a zero that
    is still connected to the net's parameters, so backward and AMP's grad checks keep working.
    """

    def __init__(self, teacher: VelocityFn, classes: Sequence[int] | None = None) -> None:
        self.teacher = _freeze(teacher) if isinstance(teacher, nn.Module) else teacher
        self.classes = None if classes is None else _class_tensor(classes)

    def __call__(self, net: nn.Module, batch: Batch, step: int = 0) -> Tensor:
        x, label = batch.x, batch.label
        if self.classes is not None:
            keep = torch.isin(label, self.classes.to(label.device))
            if not keep.any():
                return torch.stack([p.sum() for p in net.parameters()]).sum() * 0.0
            x, label = x[keep], label[keep]
        t = sample_time(x.shape[0], x.device).to(x.dtype)
        x_t = interpolate(x, torch.randn_like(x), t)
        with torch.no_grad():
            v_teacher = self.teacher(x_t, t, label)
        return F.mse_loss(net(x_t, t, label), v_teacher)


class DMDLoss:
    """Distribution matching for a one-step generator G(z, c) = one_step(generator, z, c) (docs/methods.md §5).

    Each call: labels uniform over `classes`, x = G(z, c) for fresh z; `fake_updates` Adam steps of the
    fake net (own optimiser) with the rectified-flow loss on detached x; then the generator loss
    0.5 * mse(x, sg(x - g)), g = (x̂_fake - x̂_real) / (mean|x - x̂_real| per sample + delta) at
    t ~ U(t_min, t_max), plus `regression_weight` * D(G(z_p, c_p), x_p) on the batch's pairs (all classes).
    The fake net should start as a copy of the teacher. state_dict() holds the fake net and its optimiser.
    """

    def __init__(
        self,
        teacher: nn.Module,
        fake_net: nn.Module,
        fake_lr: float,
        classes: Sequence[int],
        t_min: float = 0.02,
        t_max: float = 0.98,
        fake_updates: int = 1,
        regression_weight: float = 0.25,
        delta: float = 1e-6,
        gan: Any = None,
        distance: Distance = "l2",
        fake_betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        if gan is not None:
            raise NotImplementedError("DMD2's GAN head is not implemented; leave gan unset")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if fake_updates < 1 or regression_weight < 0 or delta <= 0:
            raise ValueError(
                f"need fake_updates >= 1, regression_weight >= 0, delta > 0; got {fake_updates}, "
                f"{regression_weight}, {delta}"
            )
        self.teacher = _freeze(teacher)
        self.fake_net = fake_net.requires_grad_(True)
        self.fake_optimizer = torch.optim.Adam(fake_net.parameters(), lr=fake_lr, betas=fake_betas)
        self.classes = _class_tensor(classes)
        self.t_min, self.t_max, self.fake_updates = t_min, t_max, fake_updates
        self.regression_weight, self.delta = regression_weight, delta
        self.distance = make_distance(distance)
        self.flow_loss = RectifiedFlowLoss()
        self.last_metrics: dict[str, Tensor] = {}  # detached 0-dim tensors: no device sync until logged

    def _update_fake(self, x: Tensor, label: Tensor) -> Tensor:
        """Fit the fake flow to the generator's current (detached) samples; returns the last RF loss."""
        self.fake_net.train()
        for _ in range(self.fake_updates):
            loss = self.flow_loss(self.fake_net, Batch(x=x, label=label))
            self.fake_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.fake_optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def direction(self, x: Tensor, label: Tensor) -> Tensor:
        """Normalised distribution-matching direction g (B,*shape); x - g is closer to the teacher's data."""
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
        x_t = interpolate(x, torch.randn_like(x), t)
        self.fake_net.eval()
        x_real = denoise(x_t, t, self.teacher(x_t, t, label))
        x_fake = denoise(x_t, t, self.fake_net(x_t, t, label))
        scale = (x - x_real).abs().flatten(1).mean(1) + self.delta
        return (x_fake - x_real) / expand_time(scale, x)

    def __call__(self, generator: VelocityFn, batch: Batch, step: int = 0) -> Tensor:
        label = self.classes.to(batch.x.device)[
            torch.randint(len(self.classes), (batch.x.shape[0],), device=batch.x.device)
        ]
        x = one_step(generator, torch.randn_like(batch.x), label)
        fake_loss = self._update_fake(x.detach(), label)
        g = self.direction(x.detach(), label)
        loss = dm_loss = 0.5 * F.mse_loss(x, (x - g).detach())
        reg_loss = torch.zeros((), device=x.device)
        if self.regression_weight > 0:
            if batch.z is None:
                raise ValueError(
                    "DMD's regression term needs paired batches (batch.z); or regression_weight=0"
                )
            reg_loss = self.distance(one_step(generator, batch.z, batch.label), batch.x)
            loss = loss + self.regression_weight * reg_loss
        self.last_metrics = {
            "dm_loss": dm_loss.detach(),
            "reg_loss": reg_loss.detach(),
            "fake_loss": fake_loss,
        }
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"fake_net": self.fake_net.state_dict(), "fake_optimizer": self.fake_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fake_net.load_state_dict(state["fake_net"])
        self.fake_optimizer.load_state_dict(state["fake_optimizer"])
