"""Progress lines: what a stage without a terminal (DVC under Prefect, `| tee`) prints while it works."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from pipeline.config import TrainSection
from pipeline.data import Dataset, RandomBatches
from pipeline.flow import RectifiedFlowLoss
from pipeline.nets import NetSpec, build_net
from pipeline.pairs import generate_pairs
from pipeline.progress import Progress, duration
from pipeline.training import train

LINE = re.compile(
    r"^teacher: step (?P<done>\d+)/40 \(\d+%\) loss (?P<loss>\S+) lr (?P<lr>\S+) · \S+ steps/s · (ETA|done in) \S+$"
)


def test_lines_every_n_units_and_at_the_end_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress(25, "pairs (euler-8)", unit="pair", every=10, stream=out)
    for _ in range(5):
        bar.update(5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[2] for line in lines] == ["10/25", "20/25", "25/25"]
    assert "ETA" in lines[0] and "done in" in lines[-1] and "pairs/s" in lines[-1]


def test_no_lines_when_disabled() -> None:
    out = io.StringIO()
    bar = Progress(10, "x", every=1, stream=out, enabled=False)
    bar.update(10)
    assert out.getvalue() == ""


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4s"), (185, "3m05s"), (3720, "1h02m")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_training_loop_prints_step_loss_lr_rate_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    data = Dataset(rng.uniform(-1, 1, (64, 2)).astype(np.float32), rng.integers(0, 4, 64).astype(np.int64), 4)
    cfg = TrainSection(steps=40, batch_size=8, lr=1e-3, seed=0, log_every=10, warmup_steps=0, lr_schedule="constant")
    torch.manual_seed(0)
    result = train(build_net(NetSpec(kind="mlp", width=8, depth=1, emb_dim=4), (2,), 4), RectifiedFlowLoss(),
                   RandomBatches(data, 8, 0), cfg, desc="teacher")  # fmt: skip
    lines = [m for m in map(LINE.match, capsys.readouterr().err.splitlines()) if m]
    assert [int(m["done"]) for m in lines] == [10, 20, 30, 40]
    assert float(lines[-1]["loss"]) == pytest.approx(np.mean(result.losses[-10:]), rel=1e-3)
    assert float(lines[-1]["lr"]) == pytest.approx(1e-3)


def test_pair_generation_prints_pairs_done(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    def v(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return -x

    generate_pairs(v, tmp_path, n_pairs=40, shard_size=20, solve_batch=4, sampler="euler-2", seed=0,
                   data_shape=(2,), num_classes=3)  # fmt: skip
    counts = re.findall(r"pairs \(euler-2\): (\d+)/40 pairs", capsys.readouterr().err)
    assert counts[-1] == "40" and len(counts) == 10
