"""Model artifacts: `model.pt` (state dict only) + `meta.json` (how to rebuild and sample it).

Every model — teacher, 2-flow, one-step student, MSD router, featurizer — is saved the same way, so
`slimstep sample` and `eval` load any of them without knowing which stage made it. The metadata holds
no time, run id or commit: identical inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.atomic import atomic_torch_save, atomic_write_text
from pipeline.nets import NetSpec, build_net
from pipeline.runtime import is_main_process

MODEL_FORMAT = 1
WEIGHTS, META = "model.pt", "meta.json"
RAW_WEIGHTS = "raw.pt"  # a 2-flow's raw (non-EMA) weights beside its EMA model.pt: distillation starts from them


@dataclass
class LoadedModel:
    net: nn.Module
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.meta["stage"]


def save_model(directory: Path, net: nn.Module, meta: dict[str, Any]) -> None:
    """`meta` needs at least stage, kind (flow|onestep|router|featurizer), data_shape, num_classes.

    Under DDP only rank 0 writes (the ranks' weights are the same)."""
    if not is_main_process():
        return
    directory.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(net.state_dict(), directory / WEIGHTS)
    full = {
        "format_version": MODEL_FORMAT,
        "time_convention": "noise t=0, data t=1, x_t = t x + (1-t) z",
        **meta,
    }
    atomic_write_text(directory / META, json.dumps(full, indent=2, sort_keys=True))


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a model folder (no {META}); run the stage that makes it")
    return json.loads(path.read_text())


def _build_velocity_net(meta: dict[str, Any]) -> nn.Module:
    return build_net(NetSpec.model_validate(meta["net"]), tuple(meta["data_shape"]), meta["num_classes"])


# Builders by artifact kind; other modules (featurizer, msd) register theirs at import.
BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "flow": _build_velocity_net,
    "onestep": _build_velocity_net,
}


# Modules that register a kind's builder when imported; load_model imports them on demand.
PROVIDERS = {"router": "pipeline.msd", "featurizer": "pipeline.featurizer"}


def load_model(directory: Path | str, device: torch.device | str = "cpu") -> LoadedModel:
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("format_version", 0) > MODEL_FORMAT:
        raise ValueError(
            f"{directory}: format {meta['format_version']} is newer than this slimstep ({MODEL_FORMAT})"
        )
    if meta["kind"] in PROVIDERS:
        importlib.import_module(PROVIDERS[meta["kind"]])
    if meta["kind"] not in BUILDERS:
        raise ValueError(f"{directory}: unknown model kind {meta['kind']!r} (known: {sorted(BUILDERS)})")
    net = BUILDERS[meta["kind"]](meta)
    net.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
    return LoadedModel(net=net.to(device).eval().requires_grad_(False), meta=meta)


def model_hash(folder: Path | str) -> str:
    """Content hash of a model folder (weights + metadata): byte-identical models hash the same."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, META):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()[:16]
