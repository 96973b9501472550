"""The one training loop every stage uses: EMA, warm-up, clipping, AMP, DDP, checkpoint/resume, progress.

Losses are objects called `loss(net, batch, step)`; the loop knows nothing about what they compute.
Resuming restores weights, EMA, optimiser, RNG states, the batch source and the loss's own state, so a
killed run ends with the same weights as one that was never interrupted (on CPU, same thread count).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.checkpoint import CHECKPOINT_FORMAT as CHECKPOINT_FORMAT  # re-exported: older imports
from pipeline.checkpoint import load_checkpoint, save_checkpoint, set_aside
from pipeline.config import TrainSection
from pipeline.errors import NonFiniteError, first_line
from pipeline.flow import Batch
from pipeline.progress import Progress
from pipeline.runtime import is_main_process, rank, world_size


class Loss(Protocol):
    def __call__(self, net: nn.Module, batch: Batch, step: int) -> torch.Tensor: ...


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class NullTracker:
    """Tracker that records nothing: for unit tests and library use without MLflow."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        return None


class EMA:
    """Exponential moving average of weights with the official warm-up `min(mu, (1 + n) / (10 + n))`."""

    def __init__(self, net: nn.Module, mu: float) -> None:
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.mu = mu
        # Tensors listed once: walking the module tree every step cost ~0.5 ms/step on small CPU nets.
        self._pairs = (
            list(self.net.parameters()), [p.detach() for p in net.parameters()],
            list(self.net.buffers()), list(net.buffers()),
        )  # fmt: skip

    @torch.no_grad()
    def update(self, n: int) -> None:
        """Move the average towards the tracked net's current weights (step `n` sets the warm-up decay)."""
        decay = min(self.mu, (1 + n) / (10 + n))
        ema_params, params, ema_buffers, buffers = self._pairs
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(ema_buffers, buffers, strict=True):
            ema_buffer.copy_(buffer)


def learning_rate(step: int, settings: TrainSection) -> float:
    """Linear warm-up, then constant or cosine decay to zero; a pure function of the step (nothing to resume)."""
    warm = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
    if settings.lr_schedule == "cosine":
        return settings.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / settings.steps)))
    return settings.lr * warm


@dataclass
class TrainResult:
    net: nn.Module  # raw weights (DDP unwrapped)
    ema: nn.Module  # the EMA copy: what is sampled, evaluated and used as a teacher
    losses: list[float] = field(
        default_factory=list
    )  # loss at every step of this process (resumed ones included)
    resumed_from: int = 0


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else None


def _restore(state: dict[str, Any], net: nn.Module, ema: EMA, optimizer: Any, batches: Any, loss: Any) -> int:
    net.load_state_dict(state["net"])
    ema.net.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    if state["batches"] is not None:
        batches.load_state_dict(state["batches"])
    if state["loss"] is not None:
        loss.load_state_dict(state["loss"])
    return int(state["step"])


def non_finite_loss(desc: str, value: float, step: int, settings: TrainSection) -> NonFiniteError:
    return NonFiniteError(
        f"the loss is {value} at step {step} of {settings.steps} ({desc}); nothing was saved. Likely causes: "
        f"non-finite values in the data or pairs, a too high learning rate (lr = {settings.lr}), "
        "an infinite or huge loss weight in params.yaml"
    )


def train(
    net: nn.Module,
    loss: Loss,
    batches: Iterator[Batch],
    settings: TrainSection,
    checkpoint: Path | None = None,
    tracker: Tracker | None = None,
    desc: str = "train",
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `net` for `settings.steps` optimiser steps; resume from `checkpoint` when it exists.

    `stop_after` ends the run early (after that many total steps, checkpoint written) — how tests
    simulate a killed stage.
    """
    tracker = tracker or NullTracker()
    device = next(net.parameters()).device
    torch.manual_seed(settings.seed)
    ema = EMA(net, settings.ema_decay)
    # Fused kernels: the optimiser step was 4-5x faster on CPU (benchmarks/results/training.json).
    params = list(net.parameters())

    def new_optimizer() -> torch.optim.AdamW:
        return torch.optim.AdamW(
            params, lr=settings.lr, weight_decay=settings.weight_decay, fused=device.type in ("cpu", "cuda")
        )

    optimizer = new_optimizer()
    start, losses = 0, []

    # Resume; a checkpoint that does not fit this run is set aside and the run starts afresh.
    state = load_checkpoint(checkpoint) if checkpoint else None
    if state is not None and checkpoint is not None:
        fresh = copy.deepcopy((net.state_dict(), _state_of(batches), _state_of(loss)))
        try:
            start, losses = _restore(state, net, ema, optimizer, batches, loss), state["losses"].tolist()
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            set_aside(checkpoint, f"does not fit this run ({first_line(exc)})")
            net.load_state_dict(fresh[0])
            for obj, initial in ((batches, fresh[1]), (loss, fresh[2])):
                if initial is not None:
                    obj.load_state_dict(initial)
            torch.manual_seed(settings.seed)
            ema, optimizer = EMA(net, settings.ema_decay), new_optimizer()

    model = net
    if world_size() > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
        # Each rank holds other rows of the global batch: its loss's own draws (t, fresh noise) must differ too.
        torch.manual_seed(settings.seed * 1_000_003 + 7_919 * (start + 1) + rank())
    use_amp = settings.amp and device.type == "cuda"
    end = settings.steps if stop_after is None else min(settings.steps, stop_after)
    shown = progress and is_main_process()
    bar = Progress(settings.steps, desc, initial=start, every=settings.log_every, enabled=shown)

    def save() -> None:
        if checkpoint is None or not is_main_process():
            return
        save_checkpoint(
            {
                "format_version": CHECKPOINT_FORMAT,
                "step": step + 1,
                "net": net.state_dict(),
                "ema": ema.net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(),
                "batches": _state_of(batches),
                "loss": _state_of(loss),
                "losses": torch.tensor(losses, dtype=torch.float64),
            },
            checkpoint,
        )

    # Optimise.
    model.train()
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        batch = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            value = loss(model, batch, step)
        current = value.item()
        if not math.isfinite(current):
            bar.close()
            raise non_finite_loss(desc, current, step + 1, settings)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, settings.grad_clip, foreach=True)
        optimizer.step()
        ema.update(step)
        losses.append(current)

        # Record.
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            recent = losses[-settings.log_every :]
            metrics = {"train/loss": sum(recent) / len(recent), "train/lr": optimizer.param_groups[0]["lr"]}
            metrics.update({f"train/{k}": float(v) for k, v in getattr(loss, "last_metrics", {}).items()})
            bar.update(1, loss=metrics["train/loss"], lr=metrics["train/lr"])
            if is_main_process():
                tracker.log_metrics(metrics, step=step + 1)
        else:
            bar.update(1)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == end:
            save()
    bar.close()
    return TrainResult(net=net, ema=ema.net, losses=losses, resumed_from=start)
