"""MLflow conventions: one experiment, one parent run per pipeline run, one child run per stage.

The tracking store defaults to `sqlite:///<repo root>/mlflow.db` made absolute from git's common dir,
so stages run from a temp copy (`dvc exp run --temp`) still log to the same place. The parent run id
travels in SLIMSTEP_PARENT_RUN_ID (exporting MLFLOW_RUN_ID would hijack the child, mlflow #15713).
Logging is best effort: a locked SQLite store is retried, and a tracking failure never kills training.
A store that cannot be reached or written is found by a quick probe (seconds, not MLflow's minutes of
HTTP retries): tracking is then off for the run with one warning line, unless SLIMSTEP_TRACKING=required.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from pipeline.errors import UserError, first_line

EXPERIMENT = "slimstep"
PARENT_ENV = "SLIMSTEP_PARENT_RUN_ID"
DISABLE_ENV = "SLIMSTEP_TRACKING"  # "off" disables MLflow (unit tests, quick library use); "required" insists
REQUIRED = "required"
PROBE_TIMEOUT_S = 3.0
# Bounded HTTP retries for a server that dies mid-run (MLflow's defaults retry for minutes).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# MLflow 3's UI opens an experiment by this tag: without it a runs-only experiment lands on the GenAI overview.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
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


class TrackingUnavailable(UserError):
    """SLIMSTEP_TRACKING=required, and the store cannot be used: fail before any training."""


_problems: dict[str, str | None] = {}  # tracking URI -> why it is unusable (None: usable), probed once per process


def store_problem(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the store cannot take records now (None: it can) — a connect or a permission check, not a retry loop."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            return f"folder {path.parent} does not exist"
        if (path.exists() and not os.access(path, os.W_OK)) or not os.access(path.parent, os.W_OK):
            return f"{path} is read-only"
        return None
    if uri.startswith(("http://", "https://")):
        parsed = urlparse(uri)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout_s).close()
        except OSError as exc:
            return f"cannot connect to {parsed.hostname}:{port} ({exc.strerror or exc})"
    return None


def enabled() -> bool:
    """Tracking is on and its store usable; an unusable one warns once (or raises when it is required)."""
    mode = os.environ.get(DISABLE_ENV, "on").lower()
    if mode in {"off", "0", "false"}:
        return False
    uri = tracking_uri()
    if uri not in _problems:
        _problems[uri] = store_problem(uri)
        if _problems[uri] is not None and mode != REQUIRED:
            print(f"warning: MLflow store {uri} cannot be used ({_problems[uri]}); tracking is off for this run, "
                  "every output is kept (SLIMSTEP_TRACKING=required makes this an error)", file=sys.stderr)  # fmt: skip
    if _problems[uri] is not None and mode == REQUIRED:
        raise TrackingUnavailable(f"MLflow store {uri} cannot be used ({_problems[uri]}) and SLIMSTEP_TRACKING="
                                  "required: nothing was run; start the store, or unset SLIMSTEP_TRACKING")  # fmt: skip
    return _problems[uri] is None


def child_env() -> dict[str, str]:
    """What processes this one starts need so that they skip a store found unusable here (no second wait)."""
    return {} if enabled() else {DISABLE_ENV: "off"}


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
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def ensure_store() -> str:
    """Create the store and experiment once, before stages fan out (concurrent creation half-migrates SQLite)."""
    mlflow = _mlflow()
    experiment = retry(lambda: mlflow.set_experiment(EXPERIMENT))
    if experiment.tags.get(KIND_TAG) != MODEL_TRAINING:
        client = mlflow.MlflowClient()
        retry(lambda: client.set_experiment_tag(experiment.experiment_id, KIND_TAG, MODEL_TRAINING))
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
    """Logs into one active run; every call is retried, and the first failure warns once and stops the logging."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._client = _mlflow().MlflowClient()
        self.broken = False

    def _safe(self, call: Callable[[], Any]) -> None:
        if self.broken:
            return
        try:
            retry(call)
        except Exception as exc:  # tracking must never cost a finished training
            self.broken = True
            print(f"warning: MLflow logging failed ({first_line(exc)}); no more records for this run, outputs are kept",
                  file=sys.stderr)  # fmt: skip

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


def _spawn_helper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.tracking.worker"], stdin=subprocess.PIPE, text=True)


_prestarted: subprocess.Popen | None = None
_stage_started_ms: int | None = None  # when this stage process began: its MLflow run starts there, not later


def prestart_helper() -> None:
    """Start this process's MLflow helper now, before the stage imports torch: then the helper's ~4 s of
    start-up run beside the stage's own instead of after them. The next BackgroundTracker adopts it; a
    stage that never opens a run (bad params) just closes its stdin at exit and the helper logs nothing."""
    global _prestarted, _stage_started_ms
    _stage_started_ms = _stage_started_ms or int(time.time() * 1000)
    try:
        usable = enabled()
    except TrackingUnavailable:
        return  # the stage's own run opening reports it, as one line
    if usable and _prestarted is None and os.environ.get("RANK", "0") == "0":
        _prestarted = _spawn_helper()


class BackgroundTracker:
    """A stage's tracker: the MLflow calls run in a helper process (`pipeline.tracking.worker`).

    Importing MLflow and its SQL store costs ~5 s per process; in the helper that overlaps the stage's own
    imports and work instead of adding to every stage. Calls are queued as JSON lines on the helper's
    stdin and applied in order; `close` waits until the helper has written everything. If the stage dies,
    the helper sees end-of-input and marks the run FAILED.
    """

    def __init__(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        global _prestarted
        self._process, _prestarted = _prestarted or _spawn_helper(), None
        self._gone = False
        started = _stage_started_ms or int(time.time() * 1000)
        self._send({"op": "start", "stage": stage, "params": flatten(params), "tags": tags, "start_time": started})

    def _send(self, message: dict[str, Any]) -> None:
        if self._gone:
            return
        try:
            assert self._process.stdin is not None
            self._process.stdin.write(json.dumps(message, default=str) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:  # tracking must never cost a finished training
            self._gone = True
            print(f"warning: MLflow logging helper is gone ({exc}); outputs are kept", file=sys.stderr)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        self._send({"op": "metrics", "metrics": values, "step": step})

    def log_params(self, params: dict[str, Any]) -> None:
        self._send({"op": "params", "params": flatten(params)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._send({"op": "artifact", "path": str(Path(path).resolve()), "folder": folder})

    def close(self, status: str, timeout: float = 600.0) -> None:
        """Finish the run with `status` and wait for the helper (killed after `timeout` s, with a warning)."""
        self._send({"op": "end", "status": status})
        with contextlib.suppress(OSError, ValueError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            warnings.warn("MLflow logging helper did not finish in time; the run may be incomplete", stacklevel=2)


@contextlib.contextmanager
def stage_run(
    stage: str, params: dict[str, Any], tags: dict[str, str]
) -> Iterator[BackgroundTracker | NullTracker]:
    """A child of the pipeline run named in SLIMSTEP_PARENT_RUN_ID, or a top-level run when there is none."""
    if not enabled():
        yield NullTracker()
        return
    tracker = BackgroundTracker(stage, params, tags)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.close(status)


def open_stage_run(
    stage: str, params: dict[str, Any], tags: dict[str, str], start_time: int | None = None
) -> MlflowTracker:
    """Create the stage's run (child of SLIMSTEP_PARENT_RUN_ID when set) with its params: the helper's first job.

    `start_time` (ms): when the stage began; the helper opens the run seconds later, which would cut its span."""
    mlflow = _mlflow()
    experiment_id = ensure_store()
    run_tags = {"slimstep.stage": stage, "git.commit": git_commit(), **tags}
    if parent := os.environ.get(PARENT_ENV):
        run_tags["mlflow.parentRunId"] = parent
    client = mlflow.MlflowClient()
    run = retry(lambda: client.create_run(experiment_id, start_time=start_time, tags=run_tags, run_name=stage))
    tracker = MlflowTracker(run.info.run_id)
    tracker.log_params(params)
    return tracker


def finish_run(run_id: str, status: str) -> None:
    """Mark a run ended; best effort like every tracking call."""
    with contextlib.suppress(Exception):
        client = _mlflow().MlflowClient()
        retry(lambda: client.set_terminated(run_id, status))


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
        finish_run(run_id, "FINISHED" if ok else "FAILED")
