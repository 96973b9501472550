"""`slimstep compare`: pipeline runs side by side from a real MLflow store (SQLite), no training needed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pandas as pd
import pytest

from pipeline.tracking import records
from tests.conftest import run

FGD = records.RANK_METRIC


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Four pipeline runs: two comparable flow runs, one with another featurizer, one `slimstep repro` run."""
    import mlflow

    from pipeline import tracking

    folder = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.chdir(folder)  # a new experiment's artifact folder lands in the working directory
    tracking.ensure_store()
    client = mlflow.MlflowClient(uri)

    def pipeline(name: str, featurizer: str | None, metrics: dict, params: dict) -> str:
        tags = {"slimstep.profile": "smoke", **({"slimstep.featurizer": featurizer} if featurizer else {})}
        run_id = tracking.start_pipeline_run(name, tags)
        tracker = tracking.MlflowTracker(run_id)
        tracker.log_metrics(metrics)
        tracker.log_params(params)
        tracking.end_pipeline_run(run_id, True)
        time.sleep(0.01)  # distinct start times: `--last` orders by them
        return run_id

    ids = {
        "slow": pipeline("flow-a", "f1", {FGD: 3.0, "teacher/euler-1/fd": 9.0}, {"distill": {"lr": 1e-3}}),
        "fast": pipeline("flow-b", "f1", {FGD: 2.5, "teacher/euler-1/fd": 9.0}, {"distill": {"lr": 2e-3}}),
        "other": pipeline("flow-c", "f2", {FGD: 1.0}, {"distill": {"lr": 1e-3}}),
    }
    repro = tracking.start_pipeline_run("repro-smoke", {"slimstep.profile": "smoke"})  # metrics on its children
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    for stage, metrics, params, tags in [
        ("eval", {FGD: 2.8}, {"eval.seeds": "2"}, {"slimstep.featurizer": "f1"}),
        ("distill@fgd", {"train/loss": 0.1}, {"distill.lr": "0.003"}, {}),
    ]:
        child = client.create_run(experiment, run_name=stage,
                                  tags={"mlflow.parentRunId": repro, "slimstep.stage": stage, **tags})  # fmt: skip
        tracking.MlflowTracker(child.info.run_id).log_metrics(metrics)
        for key, value in params.items():
            client.log_param(child.info.run_id, key, value)
    tracking.end_pipeline_run(repro, True)
    ids["repro"] = repro
    yield {"folder": folder, "uri": uri, **ids}
    patch.undo()


def test_side_by_side_ranks_and_diffs_params(store: dict) -> None:
    runs = records.pipeline_runs(run_ids=[store["slow"], store["fast"][:10]])
    comparison = records.compare(runs)
    records.check_comparable(comparison)  # same featurizer: no complaint
    table = comparison.table
    slow, fast = table.columns
    assert slow.startswith("flow-a") and fast.startswith("flow-b")
    assert table.loc[f"rank ({FGD})"].tolist() == [2, 1]
    assert table.loc[FGD].tolist() == [3.0, 2.5] and "teacher/euler-1/fd" in table.index
    assert "param distill.lr" in table.index  # differs
    assert table.loc["featurizer"].tolist() == ["f1", "f1"]


def test_repro_runs_are_read_from_their_stage_children(store: dict) -> None:
    comparison = records.compare(records.pipeline_runs(run_ids=[store["slow"], store["repro"]]))
    records.check_comparable(comparison)
    assert comparison.table.loc[FGD].tolist() == [3.0, 2.8]
    assert comparison.table.loc["param distill.lr"].tolist() == ["0.001", "0.003"]


def test_refuses_to_rank_fds_from_different_featurizers(store: dict) -> None:
    comparison = records.compare(records.pipeline_runs(last=10))
    assert len(comparison.table.columns) == 4
    with pytest.raises(records.IncomparableRuns, match="different featurizers") as refused:
        records.check_comparable(comparison)
    assert "f1" in str(refused.value) and "f2" in str(refused.value)


def test_last_picks_the_newest_runs_oldest_first(store: dict) -> None:
    runs = records.pipeline_runs(last=2)
    assert [r.info.run_id for r in runs] == [store["other"], store["repro"]]
    with pytest.raises(LookupError, match="matches 0"):
        records.pipeline_runs(run_ids=["nope"])


@pytest.mark.slow
def test_cli_saves_csv_and_refuses_with_a_clear_message(store: dict) -> None:
    folder, env = store["folder"], {"MLFLOW_TRACKING_URI": store["uri"]}
    ok = run(["slimstep", "compare", "--runs", f"{store['slow']},{store['fast']}", "--out", "cmp.csv"], folder, env)
    saved = pd.read_csv(folder / "cmp.csv", index_col="field")
    assert "saved cmp.csv" in ok.stdout and float(saved.loc[FGD].iloc[1]) == 2.5
    refused = run(["slimstep", "compare", "--last", "4", "--out", "all.csv"], folder, env, check=False)
    assert refused.returncode == 2 and "different featurizers" in " ".join(refused.stdout.split())  # rich wraps
    assert "Traceback" not in refused.stdout + refused.stderr and not (folder / "all.csv").exists()


def test_equal_scores_share_a_rank() -> None:
    assert records.ranks({"a": 2.5, "b": 2.5, "c": 1.0, "d": float("nan")}) == {"a": 2, "b": 2, "c": 1, "d": ""}


@pytest.mark.slow
def test_cli_json_and_piped_table_keep_full_names(store: dict) -> None:
    import json

    folder, env = store["folder"], {"MLFLOW_TRACKING_URI": store["uri"]}
    ids = f"{store['slow']},{store['fast']}"
    printed = run(["slimstep", "compare", "--runs", ids, "--json", "--out", "j.csv"], folder, env).stdout
    parsed = json.loads(printed)  # stdout holds nothing but the JSON
    assert parsed["rank_metric"] == FGD and [r["run_id"] for r in parsed["runs"]] == [store["slow"], store["fast"]]
    assert parsed["runs"][1]["fields"][FGD] == 2.5 and parsed["runs"][1]["fields"][f"rank ({FGD})"] == 1
    table = run(["slimstep", "compare", "--runs", ids, "--out", "t.csv"], folder, env).stdout  # piped: no terminal
    assert "teacher/euler-1/fd" in table and f"rank ({FGD})" in table and "…" not in table
