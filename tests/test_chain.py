"""End to end on the smoke profile: real DVC, real MLflow (SQLite in the temp repo)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow
COLUMNS = {"model", "sampler", "nfe", "params", "fd", "fd_std", "fd_heldout", "precision", "recall", "class_acc",
           "samples_per_s", "speedup", "equal_quality_sampler", "speedup_equal_quality"}  # fmt: skip


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def edit_params(repo: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_smoke_chain_leaderboard_and_status(smoke_repo: Path) -> None:
    board = pd.read_csv(smoke_repo / "reports/leaderboard.csv")
    assert set(board.columns) >= COLUMNS
    real = board[board["model"] == "real"].iloc[0]
    assert real["fd"] > 0 and real["class_acc"] > 0.8
    teacher = board[board["model"] == "teacher"]
    assert set(teacher["sampler"]) >= {"euler-1", "dopri5-0.001"}
    assert (teacher["params"] > 0).all() and (teacher["fd_std"] > 0).all()
    assert teacher.set_index("sampler").loc["euler-4", "nfe"] == 4
    assert (smoke_repo / "reports/grids/teacher.png").stat().st_size > 1000
    assert "up to date" in run(["dvc", "status"], smoke_repo).stdout


def test_every_student_is_on_the_leaderboard(smoke_repo: Path) -> None:
    board = pd.read_csv(smoke_repo / "reports/leaderboard.csv")
    by_model = board.groupby("model")
    for model in ("anneal@slimflow", "anneal@reflow"):
        rows = by_model.get_group(model)
        assert {"euler-1", "euler-2"} <= set(rows["sampler"]) and rows["straightness"].notna().all()
    for model in ("distill@fgd", "distill@naive-paper", "distill@naive", "msd@ensemble"):
        row = by_model.get_group(model)
        assert list(row["sampler"]) == ["onestep"] and list(row["nfe"]) == [1]
    teacher_params = by_model.get_group("teacher")["params"].iloc[0]
    assert by_model.get_group("distill@fgd")["params"].iloc[0] < teacher_params
    groups = pd.read_csv(smoke_repo / "reports/msd_groups.csv")
    assert set(groups["model"]) == {"msd@ensemble", "distill@fgd"}


def test_stepper_reports_rl_against_fixed_solvers(smoke_repo: Path) -> None:
    import json

    metrics = json.loads((smoke_repo / "metrics/stepper.json").read_text())
    assert metrics["rl"]["nfe"] > 0 and metrics["dopri5_1e-05"]["nfe"] > metrics["rl"]["nfe"]
    table = pd.read_csv(smoke_repo / "reports/stepper/pareto.csv")
    assert {"euler", "heun", "dopri5", "rl"} <= set(table["solver"])
    transfer = pd.read_csv(smoke_repo / "reports/stepper_transfer.csv")
    assert "rl" in set(transfer["solver"])
    rl_pairs = json.loads((smoke_repo / "metrics/pairs-rl.json").read_text())
    assert rl_pairs["solver"] == "rl" and rl_pairs["n_pairs"] > 0


def test_mlflow_parent_with_a_child_per_stage(smoke_repo: Path) -> None:
    with sqlite3.connect(smoke_repo / "mlflow.db") as db:
        tags = db.execute("select run_uuid, key, value from tags").fetchall()
        steps = db.execute("select count(*) from metrics where key = 'train/loss'").fetchone()[0]
    parents = {run for run, key, value in tags if key == "slimstep.kind" and value == "pipeline"}
    children = {value for run, key, value in tags if key == "mlflow.parentRunId"}
    stages = {value for run, key, value in tags if key == "slimstep.stage"}
    assert len(parents) == 1 and children == parents
    assert stages >= {
        "data",
        "featurizer",
        "teacher",
        "stepper",
        "pairs@teacher",
        "anneal@slimflow",
        "anneal@reflow",
        "distill@fgd",
        "distill@naive-paper",
        "distill@naive",
        "msd@0",
        "msd@1",
        "router",
        "meanflow",
        "eval",
    }
    assert steps >= 2  # per-step loss curves were logged


def test_eval_param_change_reruns_only_eval(smoke_copy: Path) -> None:
    edit_params(smoke_copy, "eval", "knn_k", 4)
    assert ran_stages(run(["dvc", "repro"], smoke_copy).stdout) == {"eval"}


def test_teacher_param_change_reruns_teacher_and_downstream(smoke_copy: Path) -> None:
    """Rebuild the teacher for real, then ask DVC what it has made stale (the eval test above runs a full rerun)."""
    import json

    edit_params(smoke_copy, "teacher", "lr", 0.002)
    assert ran_stages(run(["dvc", "repro", "-s", "teacher"], smoke_copy).stdout) == {"teacher"}
    stale = set(json.loads(run(["dvc", "status", "--json"], smoke_copy).stdout))
    assert {"stepper", "pairs@teacher", "distill@fgd", "msd@0", "eval"} <= stale  # direct users of models/teacher
    assert not stale & {"data", "featurizer", "teacher"}


def test_bad_param_stops_stage_with_readable_error(smoke_copy: Path) -> None:
    edit_params(smoke_copy, "teacher", "lr", "not-a-number")
    result = run(["dvc", "repro", "-s", "teacher"], smoke_copy, check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "teacher.lr" in out and "not-a-number" in out and "dvc checkout" in out
    assert "Traceback" not in out
    assert (smoke_copy / "models/featurizer/model.pt").exists()  # other stages' outputs untouched


def test_killed_teacher_resumes_to_identical_weights(smoke_copy: Path) -> None:
    reference = (smoke_copy / "models/teacher/model.pt").read_bytes()
    marker = smoke_copy / "fail-once"
    env = {"SLIMSTEP_FAIL_ONCE": f"teacher:{marker}"}
    failed = run(["dvc", "repro", "-f", "-s", "teacher"], smoke_copy, env=env, check=False)
    assert failed.returncode != 0 and marker.exists()
    assert list((smoke_copy / "scratch/teacher").glob("*/checkpoint.pt"))  # the half-way checkpoint survived
    run(["dvc", "repro", "-f", "-s", "teacher"], smoke_copy, env=env)
    assert (smoke_copy / "models/teacher/model.pt").read_bytes() == reference
    assert not (smoke_copy / "scratch/teacher").exists()  # cleaned after success


def test_sample_command_writes_grid_and_arrays(smoke_copy: Path) -> None:
    run(["slimstep", "sample", "teacher", "--n", "12", "--labels", "3,7", "--out", "grid.png"], smoke_copy)
    run(["slimstep", "sample", "teacher", "--n", "6", "--out", "s.npz", "--sampler", "euler-2"], smoke_copy)
    assert (smoke_copy / "grid.png").stat().st_size > 500
    import numpy as np

    arrays = np.load(smoke_copy / "s.npz")
    assert arrays["images"].shape == (6, 1, 8, 8) and len(arrays["labels"]) == 6


def test_regenerated_pairs_come_from_the_annealed_student(smoke_copy: Path) -> None:
    """A pair set solved by the annealed 2-flow (docs/methods.md §4) feeds distill@fgd and MSD, naive the teacher's."""
    import torch

    from pipeline.flow import sample
    from pipeline.modelio import load_model

    params = yaml.safe_load((smoke_copy / "params.yaml").read_text())
    params["pairs"]["sets"]["regen"] = {"solver": "euler-2", "policy": "models/teacher",
                                        "flow": "models/anneal@slimflow"}  # fmt: skip
    params["distill"]["pair_set"] = "regen"
    (smoke_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = set(yaml.safe_load(run(["dvc", "status", "--json"], smoke_copy).stdout))
    assert {"pairs@regen", "distill@fgd", "msd@0", "msd@1"} <= stale  # params and deps changed
    # The naive variants list the whole `distill` section (their recipe and checkpoint key read it), so they are
    # stale too: an over-declaration (a rerun too many), never a stale cache.
    assert not stale & {"teacher", "pairs@teacher", "anneal@slimflow"}

    assert ran_stages(run(["dvc", "repro", "-s", "pairs@regen"], smoke_copy).stdout) == {"pairs@regen"}
    shard = torch.load(smoke_copy / "pairs" / "regen" / "shard-00000.pt", weights_only=True)
    teacher_shard = torch.load(smoke_copy / "pairs" / "teacher" / "shard-00000.pt", weights_only=True)
    assert torch.equal(shard["z"], teacher_shard["z"])  # the same per-sample noise, a different solver
    student = load_model(smoke_copy / "models" / "anneal@slimflow").net
    expected = sample(student, shard["z"][:32], shard["label"][:32], "euler-2").x
    assert torch.allclose(shard["x"][:32], expected, atol=1e-5)
    assert not torch.allclose(shard["x"], teacher_shard["x"], atol=1e-3)
