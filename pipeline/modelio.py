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

from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.errors import IntegrityError
from pipeline.integrity import check_finite_weights, load_tensors, rebuild_hint, sha256_bytes, torch_bytes
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


def save_model(
    directory: Path, net: nn.Module, meta: dict[str, Any], extra: dict[str, dict[str, torch.Tensor]] | None = None
) -> None:
    """`meta` needs at least stage, kind (flow|onestep|router|featurizer), data_shape, num_classes.

    `extra`: more state dicts saved beside the weights (e.g. `raw.pt`). Each file's sha256 goes into
    meta.json, and non-finite weights are refused before anything is written. Under DDP only rank 0
    writes (the ranks' weights are the same).
    """
    if not is_main_process():
        return
    files = {WEIGHTS: net.state_dict(), **(extra or {})}
    for name, state in files.items():
        check_finite_weights(state, f"{directory / name} ({meta.get('stage', 'model')})")
    directory.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, state in files.items():
        data = torch_bytes(state)
        atomic_write_bytes(directory / name, data)
        hashes[name] = sha256_bytes(data)
    full = {
        "format_version": MODEL_FORMAT,
        "time_convention": "noise t=0, data t=1, x_t = t x + (1-t) z",
        **meta,
        "sha256": hashes,
    }
    atomic_write_text(directory / META, json.dumps(full, indent=2, sort_keys=True))


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a model folder (no {META}); run the stage that makes it")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc}); {rebuild_hint(directory.name, directory)}") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise IntegrityError(f"{path}: not model metadata (no 'kind'); {rebuild_hint(directory.name, directory)}")
    return meta


def load_weights(directory: Path | str, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """A state dict of a model folder, checked against the sha256 in its meta.json (models without one load as is)."""
    directory = Path(directory)
    meta = read_meta(directory)
    hint = rebuild_hint(meta.get("stage", directory.name), directory)
    return load_tensors(directory / name, meta.get("sha256", {}).get(name), hint)


def _build_velocity_net(meta: dict[str, Any]) -> nn.Module:
    return build_net(NetSpec.model_validate(meta["net"]), tuple(meta["data_shape"]), meta["num_classes"])


# Builders by artifact kind; other modules (featurizer, msd) register theirs at import.
BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "flow": _build_velocity_net,
    "onestep": _build_velocity_net,
}


# Builders that also read the model folder (an imported teacher keeps its user's code there), chosen by
# meta["builder"]; the artifact kind (flow, onestep) still says how the model is sampled.
FOLDER_BUILDERS: dict[str, Callable[[dict[str, Any], Path], nn.Module]] = {}

# Modules that register a builder when imported; load_model imports them on demand.
PROVIDERS = {"router": "pipeline.msd", "featurizer": "pipeline.featurizer", "meanflow": "pipeline.meanflow",
             "imported": "pipeline.teachers"}  # fmt: skip


def load_model(directory: Path | str, device: torch.device | str = "cpu") -> LoadedModel:
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("format_version", 0) > MODEL_FORMAT:
        raise ValueError(
            f"{directory}: format {meta['format_version']} is newer than this slimstep ({MODEL_FORMAT})"
        )
    builder = meta.get("builder", meta["kind"])
    if builder in PROVIDERS:
        importlib.import_module(PROVIDERS[builder])
    if builder in FOLDER_BUILDERS:
        net = FOLDER_BUILDERS[builder](meta, directory)
    elif builder in BUILDERS:
        net = BUILDERS[builder](meta)
    else:
        raise ValueError(f"{directory}: unknown model kind {builder!r} (known: {sorted(BUILDERS)})")
    fit_weights(net, load_weights(directory), directory / WEIGHTS)
    return LoadedModel(net=net.to(device).eval().requires_grad_(False), meta=meta)


def fit_weights(net: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """`load_state_dict`, with a mismatch told in one line naming the file (not torch's key-by-key listing)."""
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise IntegrityError(f"{source}: weights do not fit the net its meta.json describes ({first[:160]}); "
                             f"{rebuild_hint(source.parent.name, source.parent)}") from None  # fmt: skip


def model_hash(folder: Path | str) -> str:
    """Content hash of a model folder (weights + metadata): byte-identical models hash the same."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, META):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()[:16]
