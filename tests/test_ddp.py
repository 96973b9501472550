"""DDP that really shards: each rank trains on its own share of the global batch, only rank 0 writes.

Exact tests slice the data sources under a simulated rank; the slow test starts the real `teacher` stage
under `torchrun --nproc_per_node 2` (gloo, CPU) and compares it with the single-process run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import runtime
from pipeline.data import Dataset, RandomBatches
from pipeline.pairs import PairStream, generate_pairs
from tests.conftest import BIN, make_project, run


def as_rank(monkeypatch: pytest.MonkeyPatch, me: int, size: int) -> None:
    monkeypatch.setattr(runtime, "rank", lambda: me)
    monkeypatch.setattr(runtime, "world_size", lambda: size)


@pytest.mark.parametrize(("n", "size"), [(8, 2), (10, 3), (5, 1)])
def test_rank_rows_split_a_global_batch_into_disjoint_covering_shares(
    monkeypatch: pytest.MonkeyPatch, n: int, size: int
) -> None:
    rows = []
    for me in range(size):
        as_rank(monkeypatch, me, size)
        rows += list(range(n))[runtime.rank_rows(n)]
    assert rows == list(range(n))


def assert_shares_make_the_global_batches(monkeypatch: pytest.MonkeyPatch, make: Any, steps: int) -> None:
    """Rank 0's and rank 1's batches (of 2 ranks), concatenated, are the single process's, field by field."""
    as_rank(monkeypatch, 0, 1)
    single = make()
    expected = [next(single) for _ in range(steps)]
    shares = []
    for me in (0, 1):
        as_rank(monkeypatch, me, 2)
        source = make()
        shares.append([next(source) for _ in range(steps)])
    for k, whole in enumerate(expected):
        assert len(shares[0][k].label) + len(shares[1][k].label) == len(whole.label) and len(shares[0][k].label) > 0
        for field in ("x", "label", "z"):
            if getattr(whole, field) is not None:
                joined = torch.cat([getattr(shares[0][k], field), getattr(shares[1][k], field)])
                assert torch.equal(joined, getattr(whole, field)), (k, field)


def test_random_batches_shares_concatenate_to_the_single_process_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    ds = Dataset(rng.standard_normal((50, 3)).astype(np.float32), rng.integers(0, 4, 50), 4)
    assert_shares_make_the_global_batches(monkeypatch, lambda: RandomBatches(ds, 8, seed=3), steps=3)


def test_pair_stream_shares_concatenate_to_the_single_process_batch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def v(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return -x

    generate_pairs(v, tmp_path, 40, 20, 10, "euler-2", 0, (3,), 2)
    # 8 batches of 6 cross the epoch boundary at 40 pairs.
    assert_shares_make_the_global_batches(monkeypatch, lambda: PairStream(tmp_path, 6, seed=1), steps=8)


def teacher_losses(repo: Path) -> list[float]:
    """The stage's logged loss curve (MLflow train/loss every log_every steps)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("dvc.stage") == "teacher"]  # fmt: skip
    assert len(runs) == 1, f"expected one MLflow run of the teacher stage, found {len(runs)}"
    return [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.step)]


@pytest.mark.slow
def test_teacher_stage_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    one = make_project(tmp_path / "one")
    run(["python", "-m", "stages", "data"], one, env={"SLIMSTEP_TRACKING": "off"})
    two = tmp_path / "two"
    shutil.copytree(one, two, symlinks=True)
    env = {"OMP_NUM_THREADS": "1", "SLIMSTEP_THREADS": "1"}
    run(["python", "-m", "stages", "teacher"], one, env=env)
    run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "stages", "teacher"], two, env=env)

    a, b = (json.loads((repo / "metrics" / "teacher.json").read_text()) for repo in (one, two))
    assert a["params"] == b["params"]
    assert abs(a["final_loss"] - b["final_loss"]) / a["final_loss"] < 0.05, (a["final_loss"], b["final_loss"])
    curve_one, curve_two = teacher_losses(one), teacher_losses(two)  # one run each: rank 1 logs nothing
    assert len(curve_one) == len(curve_two) >= 10
    gaps = [abs(x - y) / x for x, y in zip(curve_one, curve_two, strict=True)]
    assert float(np.mean(gaps)) < 0.05, gaps
    assert sorted(p.name for p in (two / "models" / "teacher").iterdir()) == ["meta.json", "model.pt"]
