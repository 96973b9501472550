"""A stage's MLflow run is written by a helper process: everything arrives in order, a dead stage reads FAILED."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking.DISABLE_ENV, "on")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # artifacts land beside the store
    tracking.ensure_store()
    return uri


def runs(uri: str) -> int:
    import mlflow

    client = mlflow.MlflowClient(uri)
    return len(client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id]))


def only_run(uri: str):  # noqa: ANN201 - an mlflow Run
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment])
    return client, run


def test_stage_run_logs_params_metrics_tags_and_artifacts_in_order(store: str, tmp_path: Path) -> None:
    artifact = tmp_path / "table.csv"
    artifact.write_text("a,b\n1,2\n")
    with tracking.stage_run("teacher", {"teacher": {"lr": 0.001, "net": {"width": 8}}}, {"dvc.stage": "teacher"}) as t:
        assert isinstance(t, tracking.BackgroundTracker)
        for step in (10, 20, 30):
            t.log_metrics({"train/loss": 1.0 / step, "skipped": None}, step=step)
        t.set_tags({"slimstep.featurizer": "abc"})
        t.log_artifact(artifact, "reports")
    client, run = only_run(store)  # stage_run returned only after the helper finished
    assert run.info.status == "FINISHED" and run.info.run_name == "teacher"
    assert run.data.params == {"teacher.lr": "0.001", "teacher.net.width": "8"}
    assert run.data.tags["dvc.stage"] == "teacher" and run.data.tags["slimstep.featurizer"] == "abc"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05), (30, 1.0 / 30)]
    assert "skipped" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reports")] == ["reports/table.csv"]


def test_a_failing_stage_marks_its_run_failed(store: str) -> None:
    with pytest.raises(RuntimeError), tracking.stage_run("pairs@teacher", {}, {}):
        raise RuntimeError("solver diverged")
    assert only_run(store)[1].info.status == "FAILED"


def test_a_killed_stage_leaves_a_failed_run_not_a_running_one(store: str) -> None:
    code = (
        "import os\nfrom pipeline import tracking\n"
        "with tracking.stage_run('anneal@slimflow', {}, {}) as t:\n"
        "    t.log_metrics({'train/loss': 0.5}, step=1)\n"
        "    os._exit(9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9
    deadline = time.monotonic() + 60  # the orphaned helper finishes on its own after end of input
    while time.monotonic() < deadline:
        client, run = only_run(store) if runs(store) == 1 else (None, None)
        if run is not None and run.info.status != "RUNNING":
            break
        time.sleep(0.5)
    assert run is not None and run.info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0.5]
