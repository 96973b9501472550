"""What a user watches and launches: task logs with progress, experiments with overrides, the README's registry snippet.

The slow tests share the session's smoke build (conftest: `slimstep run` through the Prefect harness).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import get_args

import pytest
import yaml

from pipeline.orchestration import experiments
from pipeline.orchestration.dag import read_graph
from pipeline.orchestration.flow import ProfileChoice, StageName
from pipeline.profiles import render
from tests.conftest import BIN, ROOT, run

PROGRESS = re.compile(r"step \d+/\d+ \(\d+%\) loss \S+ lr \S+ · \S+ steps/s")
TRAINING = ("featurizer", "teacher", "anneal@", "distill@", "msd@")


# Overrides (no pipeline needed).
PARAMS = render("smoke", ROOT / "configs")


def test_overrides_set_nested_keys_and_leave_the_original_alone() -> None:
    updated = experiments.validated(PARAMS, {"teacher.lr": 0.002, "teacher.net.width": 32})
    assert updated["teacher"]["lr"] == 0.002 and updated["teacher"]["net"]["width"] == 32
    assert PARAMS["teacher"]["lr"] != 0.002


def test_unknown_key_names_the_section_and_its_keys() -> None:
    with pytest.raises(experiments.OverrideError, match=r"'teacher.lrr'.*teacher has no key 'lrr'.*lr, "):
        experiments.apply_overrides(PARAMS, {"teacher.lrr": 1.0})


def test_schema_refuses_a_bad_value_naming_the_key() -> None:
    with pytest.raises(experiments.OverrideError, match="teacher.lr"):
        experiments.validated(PARAMS, {"teacher.lr": -1})


def test_assignments_are_read_as_yaml_values() -> None:
    parsed = experiments.parse_assignments(["teacher.lr=2e-3", "eval.teacher_samplers=[euler-1]", "data.path=x"])
    assert parsed == {"teacher.lr": 0.002, "eval.teacher_samplers": ["euler-1"], "data.path": "x"}
    with pytest.raises(experiments.OverrideError, match="KEY=VALUE"):
        experiments.parse_assignments(["teacher.lr"])


def test_form_choices_match_the_profiles_and_the_dag() -> None:
    assert set(get_args(ProfileChoice)) == {"current"} | {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    graph = read_graph(ROOT)
    for name in get_args(StageName):
        assert graph.resolve(name)  # raises for a name dvc.yaml does not have
    groups = {s.split("@", 1)[0] for s in graph.stages}
    assert groups <= set(get_args(StageName))


def test_deployment_form_describes_every_field() -> None:
    from pipeline.orchestration.flow import slimstep_flow

    schema = slimstep_flow.parameters.model_dump()
    properties = schema["properties"]
    assert all(p.get("description") for p in properties.values()), [k for k, p in properties.items()
                                                                    if not p.get("description")]  # fmt: skip
    assert "null" not in json.dumps(properties["profile"]) and "null" not in json.dumps(properties["gpus"])


# Through the pipeline.
def flow_parent(repo: Path) -> dict:
    with sqlite3.connect(repo / "mlflow.db") as db:
        (run_id,) = db.execute(
            "select run_uuid from tags where key = 'slimstep.kind' and value = 'pipeline' limit 1"
        ).fetchone()
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
    return {"id": run_id, "tags": tags}


@pytest.mark.slow
def test_every_training_stage_logs_progress_to_its_prefect_task_log(smoke_repo: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId

    flow_run_id = flow_parent(smoke_repo)["tags"]["prefect.flow_run_id"]
    lines: dict[str, list[str]] = {}
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        training = [t for t in tasks if t.name.startswith(TRAINING)]
        for task in training:  # the server returns at most 200 log lines per call
            logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task.id])), limit=200)
            lines[task.name] = [log.message for log in logs]
    training = [t.name for t in training]
    assert len(training) >= 6
    for stage in training:
        assert any(PROGRESS.search(m) for m in lines.get(stage, [])), (stage, lines.get(stage, [])[:20])


@pytest.mark.slow
def test_readme_registry_snippet_works_after_repro(smoke_copy: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{smoke_copy / 'mlflow.db'}")
    for model in client.search_registered_models():  # as if only `slimstep repro` had ever run here
        client.delete_registered_model(model.name)
    out = run(["slimstep", "repro"], smoke_copy).stdout
    assert "slimstep-smoke-onestep v1" in out
    snippet = (
        "import mlflow, pandas as pd\n"
        "mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "m = mlflow.pyfunc.load_model('models:/slimstep-smoke-onestep@champion')\n"
        "x = m.predict(pd.DataFrame({'label': [3, 7], 'seed': [1, 2]}))\n"
        "assert x.shape == (2, 1, 8, 8) and -1 <= x.min() and x.max() <= 1, (x.shape, x.min(), x.max())\n"
    )
    run([str(BIN / "python"), "-c", snippet], smoke_copy)
    described = client.get_registered_model("slimstep-smoke-onestep").description
    assert "distill@fgd" in described and "FD" in described and "featurizer" in described


@pytest.mark.slow
def test_bad_override_fails_the_flow_before_anything_runs(smoke_copy: Path, prefect_api: str) -> None:
    from pipeline.orchestration.flow import PipelineError, slimstep_flow

    with pytest.raises(PipelineError, match="teacher has no key 'lrr'"):
        slimstep_flow(root=str(smoke_copy), overrides={"teacher.lrr": 0.1})
    folder = smoke_copy / experiments.EXPERIMENTS
    assert not folder.exists() or not any(folder.iterdir())  # refused before a worktree was made


@pytest.mark.slow
def test_run_with_an_override_through_the_deployment(smoke_copy: Path, prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    run(["git", "add", "-A"], smoke_copy)  # the served checkout as committed: its worktrees start from HEAD
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke built"], smoke_copy, check=False)
    before = (smoke_copy / "params.yaml").read_bytes()
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(BIN / "slimstep"), "serve", "--name", "test-exp"], cwd=smoke_copy, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with get_client(sync_client=True) as client:
            deadline = time.time() + 120
            while time.time() < deadline and server.poll() is None:
                try:
                    client.read_deployment_by_name("slimstep/test-exp")
                    break
                except ObjectNotFound:
                    time.sleep(0.5)
        flow_run = run_deployment("slimstep/test-exp", parameters={"overrides": {"eval.grid_per_class": 2}},
                                  timeout=900)  # fmt: skip
        assert flow_run.state.is_completed(), flow_run.state
    finally:
        server.terminate()
        server.wait(30)
    assert (smoke_copy / "params.yaml").read_bytes() == before  # the checkout is untouched
    workspace = smoke_copy / experiments.EXPERIMENTS / experiments.workspace_name(flow_run.name)
    assert yaml.safe_load((workspace / "params.yaml").read_text())["eval"]["grid_per_class"] == 2
    with sqlite3.connect(smoke_copy / "mlflow.db") as db:
        (parent,) = db.execute("select run_uuid from tags where key = 'prefect.flow_run_id' and value = ?",
                               (str(flow_run.id),)).fetchone()  # fmt: skip
        params = dict(db.execute("select key, value from params where run_uuid = ?", (parent,)).fetchall())
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (parent,)).fetchall())
    assert params["eval.grid_per_class"] == "2" and json.loads(tags["slimstep.overrides"]) == {"eval.grid_per_class": 2}
    assert tags["mlflow.runName"] == f"smoke · {flow_run.name}"
    shown = run([str(BIN / "python"), "-m", "dvc", "exp", "show", "--json"], smoke_copy).stdout
    assert tags.get("slimstep.dvc_experiment") and tags["slimstep.dvc_experiment"] in shown


def test_dag_read_is_cached_per_dvc_yaml_and_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.orchestration import dag

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    calls: list[list[str]] = []

    def fake_dvc(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, 'strict digraph {\n"a";\n"b";\n"a" -> "b";\n}\n', "")

    monkeypatch.setattr(dag.subprocess, "run", fake_dvc)
    first, second = dag.read_graph(tmp_path), dag.read_graph(tmp_path)
    assert first == second and first.upstream["b"] == {"a"} and len(calls) == 1
    (tmp_path / "params.yaml").write_text("a: 2\n")  # foreach expansions may change: ask DVC again
    dag.read_graph(tmp_path)
    assert len(calls) == 2
