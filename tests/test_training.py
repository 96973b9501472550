"""The generic training loop: determinism, kill/resume, EMA warm-up, LR schedule, clipping, loss state, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline.config import TrainSection
from pipeline.data import Dataset, RandomBatches
from pipeline.flow import Batch, RectifiedFlowLoss
from pipeline.nets import NetSpec, build_net
from pipeline.training import CHECKPOINT_FORMAT, EMA, learning_rate, load_checkpoint, train

SPEC = NetSpec(kind="mlp", width=16, depth=1, emb_dim=8)


def settings(**overrides: Any) -> TrainSection:
    base = dict(
        steps=40, batch_size=8, lr=1e-3, seed=0, checkpoint_every=10, log_every=10, warmup_steps=5,
        lr_schedule="cosine", ema_decay=0.9, amp=False,
    )  # fmt: skip
    return TrainSection(**(base | overrides))


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(64, 2)).astype(np.float32)
    return Dataset(x, rng.integers(0, 4, size=64).astype(np.int64), 4)


def fresh_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_net(SPEC, (2,), 4)


class RecordingTracker:
    def __init__(self) -> None:
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))


class CountingLoss:
    """Rectified flow plus its own resumable state (a call counter) and per-step metrics."""

    def __init__(self) -> None:
        self.calls, self.inner = 0, RectifiedFlowLoss()
        self.last_metrics: dict[str, float] = {}

    def __call__(self, net: nn.Module, batch: Batch, step: int) -> Tensor:
        assert step == self.calls  # the loop hands each step exactly once, resumed or not
        self.calls += 1
        self.last_metrics = {"calls": float(self.calls)}
        return self.inner(net, batch, step)

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])


def run(data: Dataset, cfg: TrainSection, **kwargs: Any):  # noqa: ANN201 - TrainResult
    loss = kwargs.pop("loss", None) or RectifiedFlowLoss()
    return train(fresh_net(), loss, RandomBatches(data, cfg.batch_size, cfg.seed), cfg, progress=False, **kwargs)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# Determinism and resume.
def test_same_seed_gives_bitwise_identical_raw_and_ema_weights(data: Dataset) -> None:
    cfg = settings()
    first, second = run(data, cfg), run(data, cfg)
    assert_same_weights(first.net, second.net)
    assert_same_weights(first.ema, second.ema)
    assert first.losses == second.losses and len(first.losses) == 40
    other = run(data, settings(seed=1))
    assert not torch.equal(first.net.layers[0].weight, other.net.layers[0].weight)


@pytest.mark.parametrize("stop", [20, 17])
def test_killed_run_resumes_to_identical_weights(data: Dataset, tmp_path: Path, stop: int) -> None:
    cfg = settings()
    reference = run(data, cfg)
    checkpoint = tmp_path / "checkpoint.pt"
    killed = run(data, cfg, checkpoint=checkpoint, stop_after=stop)
    assert len(killed.losses) == stop and torch.load(checkpoint, weights_only=True)["step"] == stop
    resumed = run(data, cfg, checkpoint=checkpoint)
    assert resumed.resumed_from == stop
    assert_same_weights(resumed.net, reference.net)
    assert_same_weights(resumed.ema, reference.ema)
    assert resumed.losses == reference.losses  # the resumed history includes the steps before the kill


def test_finished_checkpoint_trains_no_further(data: Dataset, tmp_path: Path) -> None:
    cfg, checkpoint = settings(), tmp_path / "checkpoint.pt"
    done = run(data, cfg, checkpoint=checkpoint)
    again = run(data, cfg, checkpoint=checkpoint)
    assert again.resumed_from == 40 and again.losses == done.losses
    assert_same_weights(again.net, done.net)


def test_checkpoint_of_another_format_is_ignored(data: Dataset, tmp_path: Path) -> None:
    cfg, checkpoint = settings(), tmp_path / "checkpoint.pt"
    run(data, cfg, checkpoint=checkpoint, stop_after=20)
    state = torch.load(checkpoint, weights_only=True)
    state["format_version"] = CHECKPOINT_FORMAT + 1
    torch.save(state, checkpoint)
    assert load_checkpoint(checkpoint) is None
    restarted = run(data, cfg, checkpoint=checkpoint)
    assert restarted.resumed_from == 0
    assert_same_weights(restarted.net, run(data, cfg).net)


def test_checkpoint_loads_weights_only_and_carries_format(data: Dataset, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    result = run(data, settings(), checkpoint=checkpoint, stop_after=10)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # no pickled code in a checkpoint
    assert state["format_version"] == CHECKPOINT_FORMAT and state["step"] == 10
    assert set(state) >= {"net", "ema", "optimizer", "rng", "batches", "loss", "losses"}
    assert state["batches"] == {"step": 10} and state["loss"] is None  # RectifiedFlowLoss has no state
    for key, value in result.net.state_dict().items():
        assert torch.equal(state["net"][key], value)
    assert state["losses"].tolist() == result.losses
    assert load_checkpoint(tmp_path / "absent.pt") is None
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files behind


# Loss state and tracking.
def test_loss_state_is_checkpointed_and_metrics_reach_the_tracker(data: Dataset, tmp_path: Path) -> None:
    cfg, checkpoint = settings(), tmp_path / "checkpoint.pt"
    first_tracker = RecordingTracker()
    run(data, cfg, checkpoint=checkpoint, stop_after=20, loss=CountingLoss(), tracker=first_tracker)
    assert torch.load(checkpoint, weights_only=True)["loss"] == {"calls": 20}
    loss, tracker = CountingLoss(), RecordingTracker()
    result = run(data, cfg, checkpoint=checkpoint, loss=loss, tracker=tracker)
    assert loss.calls == 40  # restored to 20 before the resumed steps ran (CountingLoss asserts step == calls)
    assert [step for step, _ in first_tracker.calls] == [10, 20]
    assert [step for step, _ in tracker.calls] == [30, 40]
    for step, metrics in first_tracker.calls + tracker.calls:
        assert set(metrics) == {"train/loss", "train/lr", "train/calls"}
        assert metrics["train/calls"] == step
        assert metrics["train/loss"] == pytest.approx(np.mean(result.losses[step - 10 : step]))
        assert metrics["train/lr"] == pytest.approx(learning_rate(step - 1, cfg))


def test_last_partial_window_is_logged(data: Dataset) -> None:
    tracker = RecordingTracker()
    result = run(data, settings(steps=25), tracker=tracker)
    assert [step for step, _ in tracker.calls] == [10, 20, 25]
    assert tracker.calls[-1][1]["train/loss"] == pytest.approx(np.mean(result.losses[-10:]))


# EMA.
class Scalar(nn.Module):
    """A one-parameter velocity model: v = w everywhere."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return self.w.expand_as(x)


def test_ema_update_follows_warmup_formula() -> None:
    net = Scalar(0.0)
    ema = EMA(net, mu=0.2)
    expected = 0.0
    for n, w in enumerate([1.0, 3.0, -2.0, 5.0]):
        net.w.data.fill_(w)
        net.seen.fill_(n)
        ema.update(n)
        decay = min(0.2, (1 + n) / (10 + n))  # 0.1, 0.1818.., 0.2, 0.2
        expected = decay * expected + (1 - decay) * w
        assert ema.net.w.item() == pytest.approx(expected, abs=1e-12)
        assert ema.net.seen.item() == n  # buffers are copied, not averaged
    assert not ema.net.w.requires_grad and not ema.net.training


class RecordingScalarLoss:
    """(w - 2)^2; records the weight each step sees, i.e. the raw weights after the previous update."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def __call__(self, net: nn.Module, batch: Batch, step: int) -> Tensor:
        self.seen.append(net.w.item())
        return (net.w - 2.0).pow(2).sum()


def test_ema_in_the_loop_matches_hand_computation(data: Dataset) -> None:
    cfg = settings(steps=3, lr=0.1, warmup_steps=0, lr_schedule="constant", ema_decay=0.999)
    net, loss = Scalar(0.5), RecordingScalarLoss()
    result = train(net, loss, RandomBatches(data, 4, 0), cfg, progress=False)
    weights = [*loss.seen, result.net.w.item()]  # w_0 .. w_3
    assert len(set(weights)) == 4  # each step moved the raw weight
    expected = weights[0]  # the EMA starts as a copy of the initial weights
    for n in range(3):
        decay = min(0.999, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * weights[n + 1]
    assert result.ema.w.item() == pytest.approx(expected, abs=1e-12)


# Learning-rate schedule.
@pytest.mark.parametrize(
    ("step", "factor"),
    [
        (0, 0.1 * 0.5 * (1 + math.cos(0.0))),  # first warm-up step: (0 + 1) / 10
        (4, 0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 100))),
        (9, 1.0 * 0.5 * (1 + math.cos(math.pi * 9 / 100))),
        (50, 0.5),
        (99, 0.5 * (1 + math.cos(math.pi * 99 / 100))),
        (100, 0.0),
        (150, 0.0),  # past the end it stays at zero
    ],
)
def test_cosine_schedule_with_warmup(step: int, factor: float) -> None:
    cfg = settings(steps=100, lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate(step, cfg) == pytest.approx(1e-3 * factor, abs=1e-15)


def test_constant_schedule_with_and_without_warmup() -> None:
    warm = settings(steps=100, lr=2e-3, warmup_steps=4, lr_schedule="constant")
    assert [learning_rate(s, warm) for s in range(6)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3])
    assert learning_rate(10_000, warm) == pytest.approx(2e-3)
    cold = settings(steps=100, lr=2e-3, warmup_steps=0, lr_schedule="constant")
    assert learning_rate(0, cold) == pytest.approx(2e-3)


def test_cosine_is_monotone_after_warmup() -> None:
    cfg = settings(steps=50, lr=1e-2, warmup_steps=5, lr_schedule="cosine")
    rates = [learning_rate(s, cfg) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] == 0.0


# Gradient clipping.
class Vector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return x


class LinearLoss:
    """c . w with c = (300, 400, 0): the gradient is c, its norm exactly 500."""

    def __call__(self, net: nn.Module, batch: Batch, step: int) -> Tensor:
        return (torch.tensor([300.0, 400.0, 0.0]) * net.w).sum()


@pytest.mark.parametrize(("clip", "expected"), [(1.0, [0.6, 0.8, 0.0]), (0.0, [300.0, 400.0, 0.0])])
def test_grad_clip_bounds_the_gradient_the_optimiser_sees(data: Dataset, clip: float, expected: list[float]) -> None:
    seen: list[Tensor] = []

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        seen.append(optimizer.param_groups[0]["params"][0].grad.clone())

    handle = register_optimizer_step_pre_hook(record)
    try:
        cfg = settings(steps=2, grad_clip=clip, warmup_steps=0, lr_schedule="constant")
        train(Vector(), LinearLoss(), RandomBatches(data, 4, 0), cfg, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 2
    for grad in seen:
        assert grad.tolist() == pytest.approx(expected, rel=1e-5)  # rescaled, direction kept
