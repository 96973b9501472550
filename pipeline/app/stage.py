"""The stage context: what every stage does around its own work — validate params, pick the device, join
the DDP group, open its MLflow run, key its checkpoints, write its metrics.

A bad params file stops the stage before any work with one readable message (no traceback) and exit
code 2. DVC has already removed this stage's own outs; they stay in its cache (`dvc checkout`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import tracking
from pipeline.atomic import atomic_write_text
from pipeline.config import Params, ParamsError, TrainSection, load_params
from pipeline.errors import readable_errors
from pipeline.flow import sample
from pipeline.grids import sample_grid
from pipeline.orchestration.flowlock import stop_with_flow
from pipeline.runtime import configure_threads, init_distributed, is_main_process, resolve_device
from pipeline.training import TrainResult, train

PARAMS_FILE = Path(os.environ.get("SLIMSTEP_PARAMS", "params.yaml"))
SCRATCH = Path("scratch")  # git-ignored, not declared in dvc.yaml: checkpoints live here
METRICS = Path("metrics")


@dataclass
class Stage:
    name: str
    params: Params
    device: torch.device
    tracker: tracking.BackgroundTracker | tracking.NullTracker

    def checkpoint(self, section: Any, inputs: list[Path]) -> Path:
        """Scratch path keyed by stage, its params and its inputs' contents (new inputs never resume stale work)."""
        digest = hashlib.sha256(self.name.encode())
        digest.update(json.dumps(_dump(section), sort_keys=True).encode())
        for path in inputs:
            for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
                digest.update(file.read_bytes())
        folder = SCRATCH / self.name.replace("@", "-") / digest.hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        return folder / "checkpoint.pt"

    def train(
        self,
        net: nn.Module,
        loss: Any,
        batches: Any,
        settings: TrainSection,
        section: Any,
        inputs: list[Path],
    ) -> TrainResult:
        """The training loop with this stage's checkpoint, tracker and progress label."""
        return train(
            net, loss, batches, settings,
            checkpoint=self.checkpoint(section, inputs), tracker=self.tracker, desc=self.name,
        )  # fmt: skip

    def log_samples(
        self, net: nn.Module, data_shape: list[int], num_classes: int, sampler: str = "onestep",
        classes: list[int] | None = None, per_class: int = 4,
    ) -> None:  # fmt: skip
        """The model's own sample grid on this stage's MLflow run: each student can be judged where it was trained.

        Fixed noise (seed 0), so reruns and sibling stages draw from the same latents."""
        if isinstance(self.tracker, tracking.NullTracker):
            return
        labels = torch.tensor(classes if classes is not None else list(range(num_classes))).repeat_interleave(per_class)
        z = torch.randn((len(labels), *data_shape), generator=torch.Generator().manual_seed(0))
        device = next(net.parameters()).device
        with torch.no_grad():
            x = sample(net.eval(), z.to(device), labels.to(device), sampler).x.cpu()
        path = SCRATCH / self.name.replace("@", "-") / "samples.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(x, labels, num_classes, path, f"{self.name} ({sampler})")
        self.tracker.log_artifact(path, "samples")

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """The stage's DVC metrics file, mirrored to MLflow with `/`-sectioned names."""
        if not is_main_process():
            return
        path = METRICS / f"{self.name.replace('@', '-')}.json"
        atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True))
        flat = {
            k.replace(".", "/"): v for k, v in tracking.flatten(metrics).items() if isinstance(v, int | float)
        }
        self.tracker.log_metrics(flat)


def _dump(section: Any) -> Any:
    return section.model_dump(mode="json") if hasattr(section, "model_dump") else section


def read_params() -> Params:
    try:
        return load_params(PARAMS_FILE)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(
            "Nothing was run. If DVC removed this stage's previous outputs before running it, "
            "`dvc checkout` restores them from the cache.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


@contextmanager
def stage(name: str, section_keys: list[str]) -> Iterator[Stage]:
    """Validate the whole params file, then open the stage's MLflow run with the sections it reads.

    A user-caused failure (bad data, a damaged file, a missing device, a NaN loss) ends the stage with one
    line naming the file or key (errors.readable_errors); a stage whose flow was killed stops with it.
    """
    params = read_params()
    stop_with_flow()
    with readable_errors(name):
        configure_threads()
        device = resolve_device(params.device)
        init_distributed(device)
        logged = {key: _dump(getattr(params, key)) for key in section_keys}
        tags = {"slimstep.profile": params.profile, "dvc.stage": name}
        if not is_main_process():
            yield Stage(name, params, device, tracking.NullTracker())
            return
        with tracking.stage_run(name, logged, tags) as tracker:
            yield Stage(name, params, device, tracker)
        shutil.rmtree(SCRATCH / name.replace("@", "-"), ignore_errors=True)  # done: nothing left to resume
