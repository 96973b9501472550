"""Registered models: the one-step student and the MSD router as MLflow pyfunc models with a `champion` alias.

A registered version wraps a model folder (`model.pt` + `meta.json`, loaded by `pipeline.modelio`) in a
`OneStepSampler`: input a DataFrame with `label` (and optionally `seed`, one per sample) → output images
(n, *data_shape) clamped to [-1, 1], one network call per sample. Loading the pyfunc needs this package:

    mlflow.pyfunc.load_model("models:/slimstep-smoke-onestep@champion").predict(pd.DataFrame({"label": [3, 7]}))

Each version also carries the model's ONNX export (pipeline/export.py) as the artifact `onnx/model.onnx`
beside `onnx/model.meta.json`: it needs only onnxruntime and numpy, no slimstep:

    path = mlflow.artifacts.download_artifacts("models:/slimstep-smoke-onestep@champion") + "/artifacts/onnx"

Names carry the profile (`slimstep-<profile>-onestep`, `slimstep-<profile>-msd`). Each version is tagged
with its FD and the featurizer that measured it; `champion` points at the best FD among the versions
measured by the newest version's featurizer (FDs from different featurizers are not comparable).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipeline.export import VALUE_RANGE
from pipeline.modelio import model_hash

FEATURIZER_TAG = "slimstep.featurizer"
HASH_TAG = "slimstep.model_hash"
CHAMPION = "champion"
ONNX_FILE = "model.onnx"  # in the version's `onnx` artifact folder, beside model.meta.json
REGISTERED = {"distill@fgd": "onestep", "msd@ensemble": "msd"}  # stage → registered-name suffix
WHAT = {
    "distill@fgd": "One-step SlimFlow student (stage distill@fgd): annealed reflow then flow-guided distillation",
    "msd@ensemble": "Multi-student distillation router (stage msd@ensemble): a one-step student per class group",
}


def registered_name(profile: str, stage: str) -> str:
    return f"slimstep-{profile}-{REGISTERED[stage]}"


class OneStepSampler(mlflow.pyfunc.PythonModel):
    """labels (and per-sample seeds) → one-step samples from a slimstep model folder."""

    def load_context(self, context: Any) -> None:
        import pipeline.msd  # noqa: F401 - registers the "router" builder with modelio
        from pipeline.modelio import load_model

        self.model = load_model(context.artifacts["model"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        from pipeline.flow import sample

        meta = self.model.meta
        labels = torch.as_tensor(model_input["label"].to_numpy(), dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
            raise ValueError(f"labels must lie in 0..{meta['num_classes'] - 1}")
        seeds = model_input["seed"].to_numpy() if "seed" in model_input else np.arange(len(labels))
        shape = tuple(meta["data_shape"])
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        with torch.no_grad():
            return sample(self.model.net, z, labels, "onestep").x.clamp(*VALUE_RANGE).numpy()


def _signature(shape: list[int]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "label"), ColSpec("long", "seed", required=False)])
    outputs = Schema([TensorSpec(np.dtype("float32"), (-1, *shape))])
    return ModelSignature(inputs=inputs, outputs=outputs)


@dataclass
class Registered:
    name: str
    version: str
    fd: float
    champion: bool
    new: bool

    def describe(self) -> str:
        status = "champion" if self.champion else "not champion"
        return f"{self.name} v{self.version} (fd {self.fd:.4g}, {status}{'' if self.new else ', already registered'})"


def _workspace_fd(root: Path, stage: str) -> float:
    metrics = json.loads((root / "reports/metrics.json").read_text())
    entry = metrics.get(f"{stage}/onestep") or {}
    fd = entry.get("fd")
    return float(fd) if fd is not None else math.nan


def describe(stage: str, profile: str, dataset: str, fd: float, featurizer: str) -> str:
    """The registered model's description in the MLflow UI: what it is, which data, its FD and featurizer."""
    return (
        f"{WHAT[stage]}, profile `{profile}`, trained on `{dataset}`. FD {fd:.4g} (one step, against the "
        f"training set) measured with featurizer `{featurizer[:12]}`; FDs from another featurizer are not "
        "comparable. Input: a DataFrame with `label` (and optional `seed` per sample); output: images "
        "(n, *data_shape) in [-1, 1], one network call each."
    )


def _dataset(root: Path) -> str:
    import yaml

    data = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("data") or {}
    return str(data.get("path") or data.get("dataset") or "unknown")


def _fd_of(version: Any) -> float:
    try:
        return float(version.tags.get("fd", "nan"))
    except ValueError:
        return math.nan


def register_models(run_id: str, root: Path, profile: str) -> list[Registered]:
    """Register the workspace's one-step student and MSD router under `run_id`; move `champion`."""
    from pipeline import tracking

    root = Path(root)
    if not (root / "reports/metrics.json").exists() or not (root / "models/featurizer").exists():
        return []
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    featurizer = model_hash(root / "models/featurizer")
    done = []
    for stage in REGISTERED:
        folder = root / "models" / stage
        if not (folder / "meta.json").exists():
            continue
        name, digest, fd = registered_name(profile, stage), model_hash(folder), _workspace_fd(root, stage)
        versions = tracking.retry(lambda n=name: client.search_model_versions(f"name = '{n}'"))
        same = [v for v in versions if v.tags.get(HASH_TAG) == digest and v.tags.get(FEATURIZER_TAG) == featurizer]
        if same:  # an up-to-date pipeline run: the very same model is registered already
            version, new = same[0], False
        else:
            version, new = _log_version(run_id, name, folder, stage, featurizer, digest, fd, profile), True
            versions = [*versions, version]
        peers = [v for v in versions if v.tags.get(FEATURIZER_TAG) == featurizer and not math.isnan(_fd_of(v))]
        best = min(peers, key=_fd_of, default=version)
        tracking.retry(lambda n=name, b=best: client.set_registered_model_alias(n, CHAMPION, b.version))
        text = describe(stage, profile, _dataset(root), _fd_of(best), featurizer)
        tracking.retry(lambda n=name, t=text: client.update_registered_model(n, description=t))
        done.append(Registered(name, str(version.version), fd, best.version == version.version, new))
    return done


def _log_version(
    run_id: str, name: str, folder: Path, stage: str, featurizer: str, digest: str, fd: float, profile: str
) -> Any:
    import torch

    from pipeline.export import export_model

    meta = json.loads((folder / "meta.json").read_text())
    tags = {FEATURIZER_TAG: featurizer, HASH_TAG: digest, "fd": str(fd), "slimstep.profile": profile,
            "slimstep.stage": stage, "slimstep.pipeline_run": run_id}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="slimstep-") as tmp, mlflow.start_run(run_id=run_id):
        onnx_dir = Path(tmp) / "onnx"  # pyfunc keeps the folder's name: artifacts/onnx/model.onnx
        export_model(folder, "onnx", onnx_dir / ONNX_FILE, folder.parent.parent / "reports/leaderboard.csv")
        info = mlflow.pyfunc.log_model(
            name=REGISTERED[stage], python_model=OneStepSampler(),
            artifacts={"model": str(folder), "onnx": str(onnx_dir)},
            signature=_signature(meta["data_shape"]), registered_model_name=name,
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "slimstep", "onnxruntime"],
        )  # fmt: skip
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return client.get_model_version(name, version)
