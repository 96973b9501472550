"""Benchmark 1, sampling: samples/s and latency at batch 1 and 256, one-step students vs the teacher's ODE.

With `--repo` (a finished digits run) the trained models are timed: the teacher at dopri5 (1e-05, the eval
reference, and 1e-04, the pair sampler) and at Euler N, N the smallest whose FD is at most the student's
(from the run's leaderboard, else computed with the eval stage's protocol). Without it, untrained nets of the
digits profile's sizes are timed (speed does not depend on the weights), and since an untrained net's
dopri5 NFE means nothing, the teacher runs Euler with the NFE measured on the trained digits teachers
(125 for dopri5 1e-05, 56 for 1e-04) standing in for dopri5.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from benchmarks.common import Report, interleave, median, paired_ratio
from benchmarks.context import Context

SHAPE, CLASSES = (1, 8, 8), 10  # the digits profile
BATCHES = (1, 256)
DOPRI5_NFE = {"dopri5-1e-05": 125, "dopri5-1e-04": 56}  # measured: the digits default teachers (stepper)
REFERENCE = "dopri5-1e-05"  # the eval stage's reference row (the teacher's default sampler)
TARGET_SPEEDUP = 300.0


def untrained_models() -> tuple[nn.Module, dict[str, nn.Module]]:
    from pipeline.config import Params
    from pipeline.nets import build_net

    params = Params()  # the schema defaults are the digits profile
    torch.manual_seed(0)
    teacher = build_net(params.teacher.net, SHAPE, CLASSES)
    student = build_net(params.anneal.net, SHAPE, CLASSES)
    return teacher.eval().requires_grad_(False), {"student": student.eval().requires_grad_(False)}


def trained_models(repo: Path) -> tuple[nn.Module, dict[str, nn.Module]]:
    import pipeline.msd  # noqa: F401 - registers the router builder
    from pipeline.modelio import load_model

    teacher = load_model(repo / "models" / "teacher").net
    students = {name: load_model(repo / "models" / name).net for name in ("distill@fgd", "msd@ensemble")
                if (repo / "models" / name / "meta.json").exists()}  # fmt: skip
    if not students:
        raise FileNotFoundError(f"{repo}/models holds no one-step student (distill@fgd, msd@ensemble)")
    return teacher, students


def _leaderboard_fd(board: pd.DataFrame, model: str, sampler: str) -> float | None:
    row = board[(board["model"] == model) & (board["sampler"] == sampler)]
    return None if row.empty else float(row["fd"].iloc[0])


def matched_euler(repo: Path, teacher: nn.Module, student_fd: float, max_steps: int = 512) -> dict[str, Any]:
    """Smallest Euler N whose teacher FD <= the student's: from the leaderboard, else by doubling N and scoring
    with the eval stage's protocol (same noise seeds, featurizer and reference)."""
    board = pd.read_csv(repo / "reports" / "leaderboard.csv")
    rows = board[(board["model"] == "teacher") & board["sampler"].str.startswith("euler-")].copy()
    rows["n"] = rows["sampler"].str.removeprefix("euler-").astype(int)
    scored = {int(r.n): float(r.fd) for r in rows.itertuples()}
    for n in sorted(scored):
        if scored[n] <= student_fd:
            return {"steps": n, "fd": scored[n], "source": "leaderboard", "scored": scored}

    from pipeline.config import load_params
    from pipeline.data import load_split
    from pipeline.evaluation import _solve, eval_inputs, sample_quality
    from pipeline.featurizer import features  # noqa: F401 - registers the featurizer builder
    from pipeline.modelio import load_model

    p = load_params(repo / "params.yaml").eval
    featurizer = load_model(repo / "models" / "featurizer").net
    ref, noise = eval_inputs(load_split(repo / "data"), featurizer, p.n_samples, p.seeds)
    n = max(scored, default=1) * 2
    while n <= max_steps:
        samples = [_solve(teacher, z, ref.labels, f"euler-{n}", p.batch_size)[0] for z in noise]
        scored[n] = sample_quality(samples, ref, p.knn_k)["fd"]
        if scored[n] <= student_fd:
            return {"steps": n, "fd": scored[n], "source": "computed (eval protocol)", "scored": scored}
        n *= 2
    return {
        "steps": None,
        "fd": None,
        "source": f"no Euler N <= {max_steps} reaches the student's FD",
        "scored": scored,
    }


def run(ctx: Context) -> Report:
    from pipeline.flow import sample
    from pipeline.nets import count_params

    report = Report()
    trained = ctx.repo is not None
    teacher, students = trained_models(ctx.repo) if trained else untrained_models()
    # Teacher samplers: name shown -> sampler actually run.
    teacher_samplers = {name: name if trained else f"euler-{nfe}" for name, nfe in DOPRI5_NFE.items()}
    if trained:
        board = pd.read_csv(ctx.repo / "reports" / "leaderboard.csv")
        first = next(iter(students))
        student_fd = _leaderboard_fd(board, first, "onestep")
        if student_fd is None:
            report.notes.append(f"no {first} onestep row in the leaderboard: Euler N not matched")
        else:
            match = matched_euler(ctx.repo, teacher, student_fd)
            report.figures["euler_match"] = {"student": first, "student_fd": student_fd, **match}
            if match["steps"]:
                teacher_samplers[f"euler-{match['steps']} (FD-matched)"] = f"euler-{match['steps']}"
            else:
                report.notes.append(match["source"])
    else:
        report.notes.append(
            "untrained nets of the digits profile's sizes (no --repo): the teacher's dopri5 rows run Euler with "
            f"the NFE measured on the trained digits teachers {DOPRI5_NFE}; no FD-matched Euler N"
        )
    report.settings = {
        "trained": trained, "batches": list(BATCHES), "repeats": ctx.repeats(5, 11), "threads": ctx.threads,
        "teacher_params": count_params(teacher), "student_params": {k: count_params(v) for k, v in students.items()},
        "teacher_samplers": teacher_samplers,
    }  # fmt: skip

    rows = []
    for batch in BATCHES:
        g = torch.Generator().manual_seed(ctx.seed)
        z, label = torch.randn((batch, *SHAPE), generator=g), torch.randint(CLASSES, (batch,), generator=g)
        calls = {f"{name} onestep": (net, "onestep") for name, net in students.items()}
        calls.update({f"teacher {shown}": (teacher, actual) for shown, actual in teacher_samplers.items()})
        fns = {key: partial(sample, net, z, label, sampler) for key, (net, sampler) in calls.items()}
        results: dict[str, Any] = {}
        times = interleave(fns, repeats=ctx.repeats(5, 11), warmup=1, min_block_s=0.05, results=results)
        nfe = {key: result.nfe for key, result in results.items()}
        reference = times[f"teacher {REFERENCE}"]
        for key, (_, actual) in calls.items():
            rows.append({
                "model": key.split(" ", 1)[0], "sampler": key.split(" ", 1)[1], "runs": actual, "batch": batch,
                "nfe": nfe[key], "latency_ms": 1e3 * median(times[key]), "samples_per_s": batch / median(times[key]),
                "speedup_vs_teacher_dopri5": paired_ratio(reference, times[key]),
            })  # fmt: skip
        report.figures[f"times_s_batch{batch}"] = times
    report.tables["sampling"] = rows

    # Headline: each one-step student against the teacher's dopri5 reference, at batch 256 (eval's timing batch).
    for name in students:
        row = next(r for r in rows if r["model"] == name and r["batch"] == 256)
        report.summary[f"{name} samples/s ÷ teacher {REFERENCE} (batch 256)"] = row["speedup_vs_teacher_dopri5"]
        row1 = next(r for r in rows if r["model"] == name and r["batch"] == 1)
        report.summary[f"{name} samples/s ÷ teacher {REFERENCE} (batch 1)"] = row1["speedup_vs_teacher_dopri5"]
    first = next(iter(students))
    value = report.summary[f"{first} samples/s ÷ teacher {REFERENCE} (batch 256)"]
    report.target(f"one-step student samples/s ÷ teacher dopri5 (batch 256){'' if trained else ', untrained stand-in'}",
                  value, f">= {TARGET_SPEEDUP:g}", value >= TARGET_SPEEDUP)  # fmt: skip
    return report
