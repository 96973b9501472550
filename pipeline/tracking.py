"""MLflow conventions: one experiment, one parent run per pipeline run, one child run per stage.

The tracking store defaults to `sqlite:///<repo root>/mlflow.db` made absolute from git's common dir,
so stages run from a temp copy (`dvc exp run --temp`) still log to the same place. The parent run id
travels in SLIMSTEP_PARENT_RUN_ID (exporting MLFLOW_RUN_ID would hijack the child, mlflow #15713).
Logging is best effort: a locked SQLite store is retried, and a tracking failure never kills training.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

EXPERIMENT = "slimstep"
PARENT_ENV = "SLIMSTEP_PARENT_RUN_ID"
DISABLE_ENV = "SLIMSTEP_TRACKING"  # "off" disables MLflow (unit tests, quick library use)
T = TypeVar("T")


def repo_root(start: Path | None = None) -> Path:
    """The main checkout's root, also from a git worktree or a DVC temp copy; else the working directory."""
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=start or Path.cwd(), capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return Path(common).parent
    except (subprocess.CalledProcessError, FileNotFoundError):
        return (start or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "on").lower() not in {"off", "0", "false"}


def retry(call: Callable[[], T], attempts: int = 6) -> T:
    """Parallel stages share one SQLite file: back off on `database is locked`."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:  # mlflow wraps sqlite errors in several types
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _mlflow():  # noqa: ANN202 - imported lazily: 1.5 s that unit tests and `--help` should not pay
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def ensure_store() -> str:
    """Create the store and experiment once, before stages fan out (concurrent creation half-migrates SQLite)."""
    mlflow = _mlflow()
    experiment = retry(lambda: mlflow.set_experiment(EXPERIMENT))
    return experiment.experiment_id


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def metric_name(key: str) -> str:
    """MLflow names allow letters, digits, `_-./ ` only: stage names like `anneal@slimflow` become `anneal-slimflow`."""
    return re.sub(r"[^\w\-./ ]", "-", key)


class MlflowTracker:
    """Logs into one active run; every call is retried and a failure only warns."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._client = _mlflow().MlflowClient()

    def _safe(self, call: Callable[[], Any]) -> None:
        try:
            retry(call)
        except Exception as exc:  # tracking must never cost a finished training
            warnings.warn(f"MLflow logging failed: {exc}", stacklevel=3)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(metric_name(k), float(v), now, step or 0) for k, v in metrics.items() if v is not None
        ]
        self._safe(lambda: self._client.log_batch(self.run_id, metrics=batch))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(batch), 100):
            self._safe(
                lambda chunk=batch[start : start + 100]: self._client.log_batch(self.run_id, params=chunk)
            )

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._safe(lambda: self._client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._safe(lambda: self._client.log_artifact(self.run_id, str(path), folder))


class NullTracker:
    """The no-op form: same methods, records nothing."""

    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


@contextlib.contextmanager
def stage_run(
    stage: str, params: dict[str, Any], tags: dict[str, str]
) -> Iterator[MlflowTracker | NullTracker]:
    """A child of the pipeline run named in SLIMSTEP_PARENT_RUN_ID, or a top-level run when there is none."""
    if not enabled():
        yield NullTracker()
        return
    mlflow = _mlflow()
    experiment_id = ensure_store()
    parent = os.environ.get(PARENT_ENV)
    client = mlflow.MlflowClient()
    run_tags = {"slimstep.stage": stage, "git.commit": git_commit(), **tags}
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    run = retry(lambda: client.create_run(experiment_id, tags=run_tags, run_name=stage))
    tracker = MlflowTracker(run.info.run_id)
    tracker.log_params(params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            retry(lambda: client.set_terminated(run.info.run_id, status))


def start_pipeline_run(name: str, tags: dict[str, str]) -> str | None:
    """Open the parent run that a `slimstep repro` / Prefect flow run groups its stages under."""
    if not enabled():
        return None
    mlflow = _mlflow()
    experiment_id = ensure_store()
    client = mlflow.MlflowClient()
    run_tags = {"slimstep.kind": "pipeline", "git.commit": git_commit(), **tags}
    return retry(lambda: client.create_run(experiment_id, tags=run_tags, run_name=name)).info.run_id


def end_pipeline_run(run_id: str | None, ok: bool) -> None:
    if run_id:
        client = _mlflow().MlflowClient()
        retry(lambda: client.set_terminated(run_id, "FINISHED" if ok else "FAILED"))
