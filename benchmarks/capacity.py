"""Benchmark: the student-capacity sweep — where SlimFlow pays off (docs/methods.md §3-§4).

Reuses one finished run's teacher and pairs (the first of `--runs`, else `--repo`, else a smoke chain). For
students of about 5 %, 12 %, 25 % and 50 % of the teacher's parameters (the anneal net with another width,
same kind and depth) it trains, in copies of the run, the five students of the default chain: the annealed
2-flow and plain reflow, FGD from the annealed student, and both readings of naive distillation. Every method
gets the run's own recipe (full mode) or every step count divided by QUICK_DIVISOR (--quick): same recipe and
tuning for each, none tuned per size. Every model is scored at one step (the 2-flows: one Euler step) on the
`eval` stage's reference and noise. Full mode is sized to ~45 min on a quiet 2-core machine.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from benchmarks.ablations import Variant, net_params, prepare, score, train, width_for
from benchmarks.common import RESULTS, Report
from benchmarks.context import Context

FRACTIONS = (0.05, 0.12, 0.25, 0.50)  # of the teacher's parameters
QUICK_DIVISOR = 5
# Two jobs per size, so that two workers stay busy: the SlimFlow chain, and the students that need no 2-flow.
JOBS = {
    "slimflow": [["stages", "anneal", "slimflow"], ["stages", "distill", "fgd"]],
    "baselines": [["stages", "anneal", "reflow"], ["stages", "distill", "naive-paper"],
                  ["stages", "distill", "naive"]],
}
MODELS = {"slimflow": ("anneal@slimflow", "distill@fgd"),
          "baselines": ("anneal@reflow", "distill@naive-paper", "distill@naive")}  # fmt: skip
LABELS = {"anneal@slimflow": "annealed 2-flow (1 Euler step)", "anneal@reflow": "plain reflow (1 Euler step)",
          "distill@fgd": "FGD", "distill@naive-paper": "naive (paper's reading)",
          "distill@naive": "naive (compute-matched)"}  # fmt: skip


def sizes(params: dict[str, Any], shape: tuple[int, ...], classes: int, teacher: int) -> list[tuple[float, int, int]]:
    """(fraction, width, parameters) of each student size; a net kind without a width gives none, and a width
    that two fractions share (tiny teachers) is kept once."""
    net = params["anneal"]["net"]
    out = []
    for fraction in FRACTIONS:
        width = width_for(net, shape, classes, fraction * teacher, widest=max(64, 8 * net["width"]))
        if width is not None and width not in {w for _, w, _ in out}:
            out.append((fraction, width, net_params({**net, "width": width}, shape, classes)))
    return out


def edits(params: dict[str, Any], width: int, quick: bool) -> dict[str, Any]:
    a, d = params["anneal"], params["distill"]
    out: dict[str, Any] = {"anneal.net": {**a["net"], "width": width}}
    if quick:
        for section, values in (("anneal", a), ("distill", d)):
            out[f"{section}.steps"] = max(1, values["steps"] // QUICK_DIVISOR)
            out[f"{section}.warmup_steps"] = values["warmup_steps"] // QUICK_DIVISOR
    return out


def capacity_plot(rows: list[dict[str, Any]], teacher: dict[str, float], path: Path) -> None:
    """FD at one step against student parameters, one line per method; the teacher (dopri5) for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, label in LABELS.items():
        points = sorted((r["params"], r["fd"]) for r in rows if r["model"] == model)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label,
                    linestyle="--" if model.startswith("anneal") else "-")  # fmt: skip
    ax.axhline(
        teacher["fd"], color="grey", linestyle=":", label=f"teacher, {teacher['sampler']} ({teacher['nfe']:.0f} NFE)"
    )
    ax.set_xscale("log")
    ax.set_xlabel("student parameters (log scale)")
    ax.set_ylabel("FD (one step; lower is better)")
    ax.set_title("Student capacity: FD at one step vs size")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(ctx: Context) -> Report:
    import pandas as pd

    from pipeline.data import load_split
    from pipeline.modelio import load_model
    from pipeline.nets import count_params

    report = Report()
    source = ctx.runs[0] if ctx.runs else ctx.repo or ctx.smoke_run
    if not ctx.runs and not ctx.repo:
        report.notes.append("no --runs / --repo: a smoke-profile run (tiny nets); its curves say nothing about digits")
    params = yaml.safe_load((source / "params.yaml").read_text())
    train_split = load_split(source / "data").train
    teacher_params = count_params(load_model(source / "models" / "teacher").net)
    jobs: list[tuple[float, int, int, str, Variant, Path]] = []
    for fraction, width, n in sizes(params, train_split.shape, train_split.num_classes, teacher_params):
        for job, commands in JOBS.items():
            models = MODELS[job]
            variant = Variant(f"capacity-{width}-{job}", edits(params, width, ctx.quick), models[0], False, commands,
                              rebuilt=models[1:])  # fmt: skip
            copy = ctx.workdir / variant.name
            prepare(source, copy, variant)
            jobs.append((fraction, width, n, job, variant, copy))
    jobs.sort(key=lambda j: -j[2] * sum(1 for _ in j[4].commands))  # the largest nets first
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        walls = list(pool.map(lambda j: train(j[5], j[4], threads=ctx.threads), jobs))
    report.settings["train_wall_s"] = round(time.perf_counter() - started, 1)
    rows = []
    for (fraction, width, n, job, _, copy), wall in zip(jobs, walls, strict=True):
        fds = score(source, [copy / "models" / m for m in MODELS[job]])
        rows += [{"fraction": fraction, "width": width, "params": n, "params_ratio": n / teacher_params, "model": m,
                  "fd": fd, "job_train_s": round(wall, 1)} for m, fd in zip(MODELS[job], fds, strict=True)]  # fmt: skip
    rows.sort(key=lambda r: (r["params"], list(LABELS).index(r["model"])))
    board = pd.read_csv(source / "reports" / "leaderboard.csv")
    teacher_rows = board[(board["model"] == "teacher") & board["sampler"].str.startswith("dopri5")]
    teacher = {"fd": float("nan"), "sampler": "?", "nfe": 0}
    if len(teacher_rows):
        teacher = teacher_rows.iloc[-1][["sampler", "nfe", "fd"]].to_dict()
    plot = RESULTS / "capacity.png"
    capacity_plot(rows, teacher, plot)
    report.tables["student capacity: FD at one step per method and size"] = rows
    wide = pd.DataFrame(rows).pivot_table(index=["fraction", "width", "params"], columns="model", values="fd")
    report.tables["FD by size (columns: methods)"] = wide.reset_index().to_dict("records")
    fd = {(r["fraction"], r["model"]): r["fd"] for r in rows}
    for fraction, *_ in {(r["fraction"],) for r in rows}:
        for naive in ("naive-paper", "naive"):
            key = (fraction, f"distill@{naive}")
            if key in fd and (fraction, "distill@fgd") in fd:
                report.summary[f"FGD − {naive} FD at {fraction:.0%} of the teacher"] = (
                    fd[(fraction, "distill@fgd")] - fd[key]
                )
    report.figures.update({"rows": rows, "teacher": teacher, "teacher_params": teacher_params, "plot": str(plot)})
    steps = {k: v for k, v in edits(params, 0, ctx.quick).items() if k != "anneal.net"} or "the run's own"
    report.settings.update({"run": str(source), "fractions": list(FRACTIONS), "steps": steps})
    report.notes.append("every model at one step (the 2-flows: one Euler step), the eval stage's reference and noise; "
                        "one training seed (the run's)")  # fmt: skip
    return report
