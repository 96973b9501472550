"""Orchestration: the Prefect flow over DVC's DAG, device slots, retries, cancellation, registry, scaling out.

Real Prefect (one `prefect_test_harness` server for the session), real DVC, real MLflow (SQLite in each
temp repo). Scheduling tests use a fake DAG of sleep stages (seconds); the smoke chain is built once
through `slimstep run` and copied for each test that changes it.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.orchestration import dag, devices, process
from tests.conftest import BIN, ROOT, make_project, run

FAKE_STAGE = '''
"""A stand-in stage: sleeps, then writes when it ran and what the scheduler gave it."""
import json, os, subprocess, sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
start = time.time()
if name == "bad":
    print("preparing"); print("boom: this stage always fails", flush=True); sys.exit(3)
if name == "sleeper":  # a grandchild too: cancelling must take the whole process group
    child = subprocess.Popen(["sleep", "300"])
    open("pids.json", "w").write(json.dumps({"stage": os.getpid(), "child": child.pid}))
    child.wait()
time.sleep(seconds)
os.makedirs("out", exist_ok=True)
env = {k: os.environ.get(k) for k in ("SLIMSTEP_THREADS", "CUDA_VISIBLE_DEVICES", "SLIMSTEP_PARENT_RUN_ID")}
json.dump({"start": start, "end": time.time(), **env}, open(f"out/{name}.json", "w"))
'''
FAKE_DAG = {
    "stages": {
        "a": {"cmd": "python fake_stage.py a 0", "deps": ["fake_stage.py"], "outs": ["out/a.json"]},
        "b": {
            "foreach": [1, 2],
            "do": {"cmd": "python fake_stage.py b${item} 5", "deps": ["out/a.json"], "outs": ["out/b${item}.json"]},
        },  # fmt: skip
        "c": {"cmd": "python fake_stage.py c 0", "deps": ["out/b1.json", "out/b2.json"], "outs": ["out/c.json"]},
    }
}


# Fixtures.
def commit(repo: Path, message: str, *paths: str) -> None:
    run(["git", "add", *(paths or ["-A"])], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of the project (smoke profile), nothing built: read-only."""
    return make_project(tmp_path_factory.mktemp("project") / "repo")


@pytest.fixture(scope="session")
def fake_template(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project with a fake dvc.yaml (a → b@1, b@2 → c), committed; copied per test."""
    repo = tmp_path_factory.mktemp("fake") / "repo"
    shutil.copytree(project, repo, symlinks=True)
    (repo / "fake_stage.py").write_text(FAKE_STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(FAKE_DAG, sort_keys=False))
    commit(repo, "fake DAG")
    return repo


@pytest.fixture
def fake_repo(fake_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy; MLflow off (sleep stages log nothing, and a new SQLite store costs seconds)."""
    monkeypatch.setenv("SLIMSTEP_TRACKING", "off")
    dest = tmp_path / "fake"
    shutil.copytree(fake_template, dest, symlinks=True)
    return dest


def flow_in(repo: Path, monkeypatch: pytest.MonkeyPatch, **options: object) -> dict:
    """Run the flow in this process (the harness server), from the repo root like `slimstep run`."""
    from pipeline.orchestration.flow import slimstep_flow

    monkeypatch.chdir(repo)  # MLflow places a new experiment's artifacts under the working directory
    return slimstep_flow(root=str(repo), **options)


def stamps(repo: Path, *names: str) -> list[tuple[float, float]]:
    return [(d["start"], d["end"]) for d in (json.loads((repo / f"out/{n}.json").read_text()) for n in names)]


def overlap(first: tuple[float, float], second: tuple[float, float]) -> bool:
    return first[0] < second[1] and second[0] < first[1]


def mlflow_runs(repo: Path) -> list[dict]:
    """Every MLflow run in the repo's database with its tags, for assertions without importing MLflow."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        runs = {r: {"id": r, "status": s, "tags": {}} for r, s in db.execute("select run_uuid, status from runs")}
        for run_id, key, value in db.execute("select run_uuid, key, value from tags"):
            runs[run_id]["tags"][key] = value
    return list(runs.values())


def children(repo: Path, parent: str) -> list[dict]:
    return [r for r in mlflow_runs(repo) if r["tags"].get("mlflow.parentRunId") == parent]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


# The DAG as DVC sees it.
def test_dot_parse_matches_dvc_index(project: Path, fake_template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins `dvc dag --dot` parsing against DVC's internal index: fails when either moves."""
    from dvc.repo import Repo

    monkeypatch.chdir(project)  # DVC names stages relative to the working directory
    graph = dag.read_graph(project)
    with Repo(str(project)) as repo:
        index = repo.index
        expected = {s.addressing: set() for s in index.stages}
        for stage, needs in index.graph.edges:  # DVC's edges point from a stage to what it needs
            expected[stage.addressing].add(needs.addressing)
    assert {s: set(u) for s, u in graph.upstream.items()} == expected
    assert graph.upstream["eval"] >= {"featurizer", "teacher", "distill@fgd"}
    assert dag.read_graph(fake_template).order() == ["a", "b@1", "b@2", "c"]


def test_targets_select_upstream_and_foreach_groups() -> None:
    graph = dag.parse_dot('strict digraph {\n"a";\n"b@1";\n"b@2";\n"c";\n"x";\n'
                          '"a" -> "b@1";\n"a" -> "b@2";\n"b@1" -> "c";\n"b@2" -> "c";\n}\n')  # fmt: skip
    assert graph.restrict(["c"]).order() == ["a", "b@1", "b@2", "c"]
    assert graph.restrict(["b"]).stages == ["a", "b@1", "b@2"]
    assert graph.restrict(["b@2"]).stages == ["a", "b@2"]
    assert graph.levels() == [["a", "x"], ["b@1", "b@2"], ["c"]] and graph.width() == 2
    with pytest.raises(dag.GraphError, match="no stage 'nope'"):
        graph.restrict(["nope"])


# Device slots.
def test_slots_from_cores_and_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    two = devices.plan_slots(width=3, cores=2)
    assert (two.size, two.threads, two.gpu) == (2, 1, False)
    assert two.env("cpu1") == {"CUDA_VISIBLE_DEVICES": "", "SLIMSTEP_THREADS": "1", "OMP_NUM_THREADS": "1",
                               "MKL_NUM_THREADS": "1"}  # fmt: skip
    assert devices.plan_slots(width=4, cores=16).threads == 4
    assert devices.plan_slots(slots=1, cores=2).threads == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    gpus = devices.plan_slots(cores=16)
    assert gpus.devices == ("2", "5") and gpus.threads == 8 and gpus.env("5")["CUDA_VISIBLE_DEVICES"] == "5"
    assert devices.plan_slots(gpus=1, cores=16).devices == ("2",)
    assert not devices.plan_slots(gpus=0, cores=16).gpu
    with pytest.raises(ValueError, match="--gpus 3"):
        devices.plan_slots(gpus=3)
    assert devices.limit_name("Node_7.lab") == "slimstep-devices-node-7-lab"


def test_device_pool_hands_each_device_to_one_holder(tmp_path: Path) -> None:
    pool, other = (devices.DevicePool(("0", "1"), tmp_path) for _ in range(2))  # two flow runs on one host
    with pool.take() as first, other.take() as second:
        assert {first, second} == {"0", "1"}
    with pool.take() as again:
        assert again == "0"


def test_killing_a_stage_takes_its_whole_process_group(tmp_path: Path) -> None:
    script = "import subprocess, sys; c = subprocess.Popen(['sleep', '300']); print(c.pid, flush=True); c.wait()"
    lines: list[str] = []
    worker = threading.Thread(target=lambda: process.run_stage(
        "s", tmp_path, dict(os.environ), tmp_path / "s.log", [sys.executable, "-c", script], lines.append))  # fmt: skip
    worker.start()
    deadline = time.time() + 60
    while not lines and time.time() < deadline:
        time.sleep(0.1)
    assert lines and process.live_groups()
    assert process.kill_all() == 1
    worker.join(30)
    assert not alive(int(lines[0])) and not process.live_groups()  # gone by the time kill_all returns


# The flow on a fake DAG.
@pytest.mark.slow
def test_independent_stages_overlap_when_slots_allow(
    fake_repo: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = flow_in(fake_repo, monkeypatch, slots=2)
    assert result["stages"] == {"a": "ran", "b@1": "ran", "b@2": "ran", "c": "ran"}
    b1, b2 = stamps(fake_repo, "b1", "b2")
    assert overlap(b1, b2)
    (c,) = stamps(fake_repo, "c")
    assert c[0] >= max(b1[1], b2[1])  # dependency order
    given = [json.loads((fake_repo / f"out/{n}.json").read_text()) for n in ("b1", "b2")]
    assert all(g["SLIMSTEP_THREADS"] == "1" and g["CUDA_VISIBLE_DEVICES"] == "" for g in given)
    assert "up to date" in run([str(BIN / "dvc"), "status"], fake_repo).stdout


@pytest.mark.slow
def test_the_prefect_limit_itself_serialises_stages(
    fake_repo: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slots in this flow, but the host's global limit holds one: the limit wins, no overlap (strict)."""
    from prefect import flow

    from pipeline.orchestration.flow import StageContext, run_graph

    graph = dag.read_graph(fake_repo)
    slots = devices.plan_slots(slots=2, cores=2)
    devices.ensure_limit("slimstep-test-one", 1)

    @flow
    def limited(limit: str) -> dict:
        ctx = StageContext(fake_repo, dict(os.environ), slots, limit, devices.DevicePool(slots.devices),
                           fake_repo / "logs")  # fmt: skip
        schedule = run_graph(graph, ctx, retries=0, in_flight=2)
        return {"done": sorted(schedule.done), "failed": schedule.failed}

    missing = limited("slimstep-no-such-limit")  # strict=True: a missing limit fails loudly, never a no-op
    assert "a" in missing["failed"] and "slimstep-no-such-limit" in missing["failed"]["a"]
    assert limited("slimstep-test-one")["done"] == ["a", "b@1", "b@2", "c"]
    assert not overlap(*stamps(fake_repo, "b1", "b2"))


@pytest.mark.slow  # starts the session's Prefect test server (~20 s): end to end, not the fast lane
def test_slots_left_by_dead_runs_are_released(prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    name, pool = "slimstep-test-stale", devices.DevicePool(("0", "1"), tmp_path)
    devices.ensure_limit(name, 2)
    with get_client(sync_client=True) as client:  # two runs were killed holding both slots
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=2))
        with pool.take():  # one live stage on this host really holds a device
            assert devices.ensure_limit(name, 2, held=pool.held()) == 1
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1


@pytest.mark.slow
def test_failed_stage_reports_its_log_tail_and_stops_downstream(
    fake_repo: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    from pipeline.orchestration.flow import PipelineError

    spec = yaml.safe_load((fake_repo / "dvc.yaml").read_text())
    spec["stages"]["bad"] = {"cmd": "python fake_stage.py bad 0", "deps": ["out/a.json"], "outs": ["out/bad.json"]}
    spec["stages"]["c"]["deps"].append("out/bad.json")
    (fake_repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(PipelineError) as failure:
        flow_in(fake_repo, monkeypatch, retries=0)
    message = str(failure.value)
    assert "bad" in message and "boom: this stage always fails" in message and "not run: c" in message
    assert (fake_repo / "out/b1.json").exists() and not (fake_repo / "out/c.json").exists()
    with get_client(sync_client=True) as client:  # what the UI shows for the failed task run
        flow_run = client.read_flow_runs(limit=1, sort="START_TIME_DESC")[0]
        tasks = client.read_task_runs(flow_run_filter=_by_id(flow_run.id))
    bad = next(t for t in tasks if t.name == "bad")
    assert bad.state.is_failed() and "boom: this stage always fails" in bad.state.message


def _by_id(flow_run_id: object) -> object:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


@pytest.mark.slow
def test_cancelling_the_flow_kills_each_stage_process_group(fake_repo: Path, prefect_api: str) -> None:
    spec = yaml.safe_load((fake_repo / "dvc.yaml").read_text())
    spec["stages"] = {"sleeper": {"cmd": "python fake_stage.py sleeper 0", "outs": ["out/sleeper.json"]}}
    (fake_repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    flow_run = subprocess.Popen([str(BIN / "slimstep"), "run", "--no-register"], cwd=fake_repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    pids_file, deadline = fake_repo / "pids.json", time.time() + 120
    while not pids_file.exists() and time.time() < deadline and flow_run.poll() is None:
        time.sleep(0.2)
    time.sleep(0.3)
    pids = json.loads(pids_file.read_text())
    assert alive(pids["stage"]) and alive(pids["child"])
    flow_run.send_signal(signal.SIGTERM)  # what a Prefect runner/worker does to cancel a flow run
    output, _ = flow_run.communicate(timeout=60)
    assert flow_run.returncode != 0, output
    deadline = time.time() + 15
    while (alive(pids["stage"]) or alive(pids["child"])) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(pids["stage"]) and not alive(pids["child"]), output


# Deployments.
def test_prefect_yaml_deployments_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert flow.name == "slimstep"
        flow.validate_parameters(deployment.get("parameters", {}))


@pytest.mark.slow
def test_serve_registers_a_scheduled_deployment(fake_repo: Path, prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    command = [str(BIN / "slimstep"), "serve", "--cron", "0 3 * * *", "--name", "test-serve"]
    server = subprocess.Popen(command, cwd=fake_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deployment, deadline = None, time.time() + 120
        with get_client(sync_client=True) as client:
            while deployment is None and time.time() < deadline and server.poll() is None:
                try:
                    deployment = client.read_deployment_by_name("slimstep/test-serve")
                except ObjectNotFound:
                    time.sleep(0.5)
        assert deployment is not None, server.stdout.read1().decode() if server.poll() is not None else "timeout"
        assert deployment.parameters["root"] == str(fake_repo)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    finally:
        server.terminate()
        server.wait(30)


# The smoke chain through the flow (built once).
@dataclass
class FlowBuild:
    repo: Path


@pytest.fixture(scope="session")
def flow_build(smoke_repo: Path) -> FlowBuild:
    """The session's smoke build (conftest runs it through `slimstep run`)."""
    return FlowBuild(smoke_repo)


@pytest.fixture
def flow_copy(flow_build: FlowBuild, tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(flow_build.repo, dest, symlinks=True)
    return dest


def pipeline_parents(repo: Path) -> list[dict]:
    return [r for r in mlflow_runs(repo) if r["tags"].get("slimstep.kind") == "pipeline"]


@pytest.mark.slow
def test_smoke_flow_end_to_end(flow_build: FlowBuild) -> None:

    repo = flow_build.repo
    stages = dag.read_graph(repo).stages
    assert "up to date" in run(["dvc", "status"], repo).stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(stages)
    (parent,) = pipeline_parents(repo)
    assert parent["status"] == "FINISHED" and parent["tags"]["slimstep.orchestrator"] == "prefect"
    kids = children(repo, parent["id"])
    assert sorted(k["tags"]["slimstep.stage"] for k in kids) == sorted(stages)  # one child per stage
    assert all(k["status"] == "FINISHED" for k in kids)
    assert parent["tags"]["slimstep.featurizer"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # other tests' flows publish under the same key later
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["slimstep-smoke"])))
    ours = [a for a in versions if str(a.flow_run_id) == parent["tags"]["prefect.flow_run_id"]]
    assert len(ours) == 1
    artifact = ours[0]
    assert "Leaderboard" in artifact.data and parent["id"] in artifact.data and "distill@fgd" in artifact.data


@pytest.mark.slow
def test_lock_is_what_plain_dvc_repro_keeps(flow_copy: Path) -> None:
    """Stages finished in completion order, yet `dvc repro` finds nothing to do and the lock is unchanged."""
    before = yaml.safe_load((flow_copy / "dvc.lock").read_text())
    assert "Running stage" not in run(["dvc", "repro"], flow_copy).stdout
    assert yaml.safe_load((flow_copy / "dvc.lock").read_text()) == before


@pytest.mark.slow
def test_second_flow_run_runs_no_stage(flow_copy: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result = flow_in(flow_copy, monkeypatch)
    assert set(result["stages"].values()) == {"up to date"}
    assert set(result["stages"]) == set(dag.read_graph(flow_copy).stages)
    assert children(flow_copy, result["mlflow_run_id"]) == []  # nothing ran, nothing logged
    parent = next(r for r in pipeline_parents(flow_copy) if r["id"] == result["mlflow_run_id"])
    assert parent["tags"]["slimstep.featurizer"]  # still a complete record of the workspace


@pytest.mark.slow
def test_retried_stage_resumes_from_its_checkpoint(
    flow_copy: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = yaml.safe_load((flow_copy / "params.yaml").read_text())
    params["teacher"]["lr"] = 0.002  # a new teacher: the stage must really run
    (flow_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    marker = flow_copy / "failed-once"
    monkeypatch.setenv("SLIMSTEP_FAIL_ONCE", f"teacher:{marker}")
    result = flow_in(flow_copy, monkeypatch, targets=["teacher"], retries=1, register_models=False)
    assert result["stages"] == {"data": "up to date", "teacher": "ran"} and marker.exists()
    attempts = children(flow_copy, result["mlflow_run_id"])
    assert sorted(a["status"] for a in attempts) == ["FAILED", "FINISHED"]
    retry = next(a for a in attempts if a["status"] == "FINISHED")
    with sqlite3.connect(flow_copy / "mlflow.db") as db:
        (first_step,) = db.execute(
            "select min(step) from metrics where run_uuid = ? and key = 'train/loss'", (retry["id"],)
        ).fetchone()
    assert first_step > params["teacher"]["steps"] // 2  # resumed half way, not restarted at step 0
    assert not (flow_copy / "scratch/teacher").exists()


@pytest.mark.slow
def test_registered_models_sample_through_pyfunc(flow_build: FlowBuild, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{flow_build.repo / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{flow_build.repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    names = {m.name for m in client.search_registered_models()}
    assert "slimstep-smoke-onestep" in names
    champion = client.get_model_version_by_alias("slimstep-smoke-onestep", "champion")
    assert champion.tags["slimstep.featurizer"] and float(champion.tags["fd"]) > 0
    model = mlflow.pyfunc.load_model("models:/slimstep-smoke-onestep@champion")
    images = model.predict(pd.DataFrame({"label": [0, 3, 9], "seed": [1, 2, 3]}))
    assert images.shape == (3, 1, 8, 8) and abs(images).max() < 10
    again = model.predict(pd.DataFrame({"label": [0, 3, 9], "seed": [1, 2, 3]}))
    assert (images == again).all()  # seeded per sample
    if "slimstep-smoke-msd" in names:
        router = mlflow.pyfunc.load_model("models:/slimstep-smoke-msd@champion")
        assert router.predict(pd.DataFrame({"label": [1, 8]})).shape == (2, 1, 8, 8)


@pytest.mark.slow
def test_register_command_keeps_an_unchanged_model(flow_copy: Path) -> None:
    out = run(["slimstep", "register"], flow_copy).stdout
    assert "slimstep-smoke-onestep v1" in out and "already registered" in out


# Past one machine.
@pytest.mark.slow
def test_second_worker_restores_stages_from_shared_run_cache(
    flow_copy: Path, tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A pushes outputs + run-cache to a shared remote; worker B's clone pulls and runs nothing."""
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], flow_copy)
    commit(flow_copy, "shared DVC remote", ".dvc/config")  # dvc.lock stays local: the run-cache carries it
    a = flow_in(flow_copy, monkeypatch, targets=["featurizer"], push=True, register_models=False)
    assert set(a["stages"].values()) == {"up to date"}  # worker A built these in the session build
    worker_b = tmp_path / "worker-b"
    run(["git", "clone", "-q", str(flow_copy), str(worker_b)], tmp_path)
    shutil.copy2(flow_copy / "params.yaml", worker_b / "params.yaml")  # the profile switch is not committed
    b = flow_in(worker_b, monkeypatch, targets=["featurizer"], pull=True, register_models=False)
    assert b["stages"] == {"data": "restored", "featurizer": "restored"}
    assert children(worker_b, b["mlflow_run_id"]) == []  # restored, not rerun: no stage logged anything
    lock_a, lock_b = (yaml.safe_load((w / "dvc.lock").read_text())["stages"] for w in (flow_copy, worker_b))
    assert {s: lock_b[s] for s in ("data", "featurizer")} == {s: lock_a[s] for s in ("data", "featurizer")}
    weights = "models/featurizer/model.pt"
    assert (worker_b / weights).read_bytes() == (flow_copy / weights).read_bytes()


DDP_SCRIPT = '''
"""pipeline.training.train on a toy problem; under torchrun each rank takes its slice of the same global batch."""
import json, sys
from dataclasses import dataclass
import torch
import torch.distributed as dist
from pipeline.config import TrainSection
from pipeline.flow import Batch, interpolate
from pipeline.nets import NetSpec, build_net
from pipeline.runtime import init_distributed, rank, world_size
from pipeline.training import train

GLOBAL_BATCH, STEPS = 64, 40

@dataclass
class TimedBatch(Batch):
    t: torch.Tensor | None = None

class SlicedBatches:
    """Step k's global batch comes from seed k on every rank; rank r keeps its 1/W of the rows."""
    def __init__(self):
        self.step = 0
    def __iter__(self):
        return self
    def __next__(self):
        g = torch.Generator().manual_seed(1000 + self.step)
        self.step += 1
        x, z = torch.randn(GLOBAL_BATCH, 2, generator=g), torch.randn(GLOBAL_BATCH, 2, generator=g)
        t, label = torch.rand(GLOBAL_BATCH, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
        rows = slice(rank() * GLOBAL_BATCH // world_size(), (rank() + 1) * GLOBAL_BATCH // world_size())
        return TimedBatch(x[rows], label[rows], z[rows], t[rows])

class FixedTimeLoss:
    """The rectified-flow loss with the batch's own times: no RNG inside, so ranks and one process agree."""
    def __call__(self, net, batch, step):
        x_t = interpolate(batch.x, batch.z, batch.t)
        return (net(x_t, batch.t, batch.label) - (batch.x - batch.z)).pow(2).mean()

def main(out):
    init_distributed(torch.device("cpu"))
    settings = TrainSection(steps=STEPS, batch_size=GLOBAL_BATCH, lr=3e-3, seed=0, amp=False, log_every=10)
    torch.manual_seed(0)
    net = build_net(NetSpec(kind="mlp", width=32, depth=2, emb_dim=8), (2,), 4)
    losses = torch.tensor(train(net, FixedTimeLoss(), SlicedBatches(), settings, progress=False).losses,
                          dtype=torch.float64)
    if world_size() > 1:
        dist.all_reduce(losses)
        losses /= world_size()
        dist.destroy_process_group()
    if rank() == 0:
        json.dump(losses.tolist(), open(out, "w"))

if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
'''


@pytest.mark.slow
def test_ddp_two_processes_match_one_at_equal_global_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ddp.json")],
        tmp_path, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "one.json")])
    runpy.run_path(str(script), run_name="__main__")  # the single-process reference, in this process
    ddp, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ddp", "one"))
    assert len(ddp) == len(one) == 40
    assert max(abs(a - b) / abs(b) for a, b in zip(ddp, one, strict=True)) < 1e-4
