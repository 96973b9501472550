"""Benchmark 4, training throughput per stage: samples/s of each stage's loss object in the one training loop
(`pipeline.training.train`: EMA, clipping, AdamW), digits-profile nets and batch, data in memory (no I/O), all
stages interleaved; ratios to the teacher stage. Then a one-off torch.profiler profile of the slowest stage.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from benchmarks.common import Report, interleave, median, paired_ratio
from benchmarks.context import Context
from benchmarks.sampling import CLASSES, SHAPE

TOP = 10


def _batches(batch_size: int, paired: bool, seed: int, pool: int = 8) -> Iterator[Any]:
    from pipeline.flow import Batch

    g = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(pool):
        x = torch.tanh(2 * torch.randn((batch_size, *SHAPE), generator=g))
        label = torch.randint(CLASSES, (batch_size,), generator=g)
        made.append(Batch(x, label, torch.randn((batch_size, *SHAPE), generator=g) if paired else None))
    return itertools.cycle(made)


def stage_setups(seed: int) -> dict[str, Callable[[], tuple[nn.Module, Any, bool]]]:
    """Stage -> builder of (net being trained, its loss object, whether batches carry pair noise)."""
    from pipeline.config import Params
    from pipeline.flow import RectifiedFlowLoss
    from pipeline.msd import DMDLoss, TeacherScoreMatchingLoss
    from pipeline.nets import build_net
    from pipeline.slimflow import AnnealingReflowLoss, FlowGuidedDistillationLoss

    params = Params()  # the schema defaults are the digits profile
    torch.manual_seed(seed)
    teacher = build_net(params.teacher.net, SHAPE, CLASSES).requires_grad_(False)
    guide = build_net(params.anneal.net, SHAPE, CLASSES).requires_grad_(False)  # the annealed student's EMA
    half = list(range(CLASSES // 2))  # an MSD student's classes (K = 2)
    a, d, m = params.anneal, params.distill, params.msd

    def student() -> nn.Module:
        return build_net(a.net, SHAPE, CLASSES)

    return {
        "teacher": lambda: (build_net(params.teacher.net, SHAPE, CLASSES), RectifiedFlowLoss(), False),
        "anneal@slimflow": lambda: (student(), AnnealingReflowLoss(a.steps, a.schedule, a.window_frac), True),
        "anneal@reflow": lambda: (student(), AnnealingReflowLoss(a.steps, "constant"), True),
        "distill@fgd": lambda: (student(), FlowGuidedDistillationLoss(guide, range(CLASSES), d.s_min, d.s_max), True),
        "distill@naive-*": lambda: (student(), FlowGuidedDistillationLoss(None, [], guidance_weight=0.0), True),
        "msd tsm": lambda: (student(), TeacherScoreMatchingLoss(teacher, half), False),
        "msd dmd": lambda: (student(), DMDLoss(teacher, copy.deepcopy(teacher), m.fake_lr, half, m.t_min, m.t_max,
                                                m.fake_updates, m.regression_weight), True),
    }  # fmt: skip


def _settings(steps: int, batch_size: int):  # noqa: ANN202 - a TrainSection
    from pipeline.config import TrainSection

    return TrainSection(steps=steps, batch_size=batch_size, lr=1e-3, seed=0, grad_clip=1.0, ema_decay=0.999,
                        checkpoint_every=10**9, log_every=steps, lr_schedule="cosine")  # fmt: skip


def profile(net: nn.Module, loss: Any, batches: Iterator[Any], steps: int, batch_size: int) -> list[dict[str, Any]]:
    """Top ops by self CPU time over `steps` training steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pipeline.training import train

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train(net, loss, batches, _settings(steps, batch_size), progress=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "cpu_total_ms": e.cpu_time_total / 1e3, "self_share": e.self_cpu_time_total / total}
            for e in events[:TOP]]  # fmt: skip


def optimizer_options(ctx: Context, report: Report) -> None:
    """Cheap fixes measured: AdamW's fused CPU kernel vs torch's default (foreach), and a foreach gradient clip,
    per optimiser step of the teacher and the student nets (the loop pays both every step)."""
    from pipeline.config import Params
    from pipeline.nets import build_net

    params = Params()  # the schema defaults are the digits profile
    rows = []
    for role, spec in (("teacher", params.teacher.net), ("student", params.anneal.net)):
        torch.manual_seed(ctx.seed)
        nets = [build_net(spec, SHAPE, CLASSES) for _ in range(2)]
        for net in nets:
            for q in net.parameters():
                q.grad = torch.randn_like(q) * 1e-3
        default = torch.optim.AdamW(nets[0].parameters(), lr=1e-4)
        fused = torch.optim.AdamW(nets[1].parameters(), lr=1e-4, fused=True)
        fns = {
            "AdamW default": default.step,
            "AdamW fused": fused.step,
            "clip default": lambda net=nets[0]: nn.utils.clip_grad_norm_(net.parameters(), 1e9),
            "clip foreach": lambda net=nets[0]: nn.utils.clip_grad_norm_(net.parameters(), 1e9, foreach=True),
        }
        times = interleave(fns, repeats=ctx.repeats(5, 9), warmup=2, min_block_s=0.05)
        for a, b in (("AdamW default", "AdamW fused"), ("clip default", "clip foreach")):
            rows.append({"net": role, "default": a, "option": b, "default_ms": 1e3 * median(times[a]),
                         "option_ms": 1e3 * median(times[b]), "speedup": paired_ratio(times[a], times[b])})  # fmt: skip
    report.tables["cheap fixes: optimiser step options (ms per call)"] = rows
    for row in rows:
        report.summary[f"{row['option']} ÷ {row['default']} speed, {row['net']} net"] = row["speedup"]


def run(ctx: Context) -> Report:
    from pipeline.nets import count_params
    from pipeline.training import train

    report = Report()
    batch_size, steps = 256, (10 if ctx.quick else 30)
    built = {name: make() for name, make in stage_setups(ctx.seed).items()}
    streams = {name: _batches(batch_size, paired, ctx.seed) for name, (_, _, paired) in built.items()}
    settings = _settings(steps, batch_size)
    fns = {name: (lambda name=name: train(built[name][0], built[name][1], streams[name], settings, progress=False))
           for name in built}  # fmt: skip
    times = interleave(fns, repeats=ctx.repeats(5, 7), warmup=1)
    rows = []
    for name, (net, loss, _) in built.items():
        rows.append({"stage": name, "loss": type(loss).__name__, "params_trained": count_params(net),
                     "samples_per_s": batch_size * steps / median(times[name]),
                     "ms_per_step": 1e3 * median(times[name]) / steps,
                     "speed_vs_teacher": paired_ratio(times["teacher"], times[name])})  # fmt: skip
    report.tables["training throughput per stage"] = rows
    report.figures["times_s_per_call"] = times
    report.settings.update({"batch_size": batch_size, "steps_per_call": steps, "repeats": ctx.repeats(5, 7)})
    for row in rows[1:]:
        report.summary[f"{row['stage']} samples/s ÷ teacher stage"] = row["speed_vs_teacher"]

    # Where the time goes in the slowest stage.
    hottest = max(rows, key=lambda r: r["ms_per_step"])["stage"]
    net, loss, _ = built[hottest]
    report.tables[f"profile of {hottest}: top {TOP} ops by self CPU time"] = profile(
        net, loss, streams[hottest], steps, batch_size
    )
    report.figures["profiled_stage"] = hottest
    optimizer_options(ctx, report)
    report.notes.append(
        f"digits nets, batch {batch_size}, {steps} steps per timed call, in-memory batches; DMD counts its "
        "fake-net update; FGD's guide is a student-sized net (the annealed EMA)"
    )
    return report
