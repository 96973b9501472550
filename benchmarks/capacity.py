"""Benchmark: the student-capacity sweep — where SlimFlow pays off (docs/methods.md §3-§4).

Each of `--runs` (one training seed each; else `--repo`, else a smoke chain) lends its teacher and pairs. For
students of about 5 %, 12 %, 25 % and 50 % of the teacher's parameters (the anneal net with another width,
same kind and depth) it trains, in copies of the run, the five students of the default chain: the annealed
2-flow and plain reflow, FGD from the annealed student, and both readings of naive distillation. Every method
gets the run's own recipe (full mode) or every step count divided by QUICK_DIVISOR (--quick): same recipe and
tuning for each, none tuned per size. A size that the run's own student already has (within REUSE_TOLERANCE)
is that student: full mode scores the run's own five models there instead of training them again. Every model
is scored at one step (the 2-flows: one Euler step) on the `eval` stage's reference and noise. Full mode took
28 min per run on a quiet 2-core machine (digits default, 2026-12-01); the result file is rewritten after
each run, so a long multi-seed sweep that is stopped keeps the seeds it finished.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from benchmarks.ablations import Variant, net_params, prepare, score, train, width_for
from benchmarks.common import RESULTS, Report, result_payload, write_result
from benchmarks.context import Context
from benchmarks.quality import mean_std, verdict

FRACTIONS = (0.05, 0.12, 0.25, 0.50)  # of the teacher's parameters
REUSE_TOLERANCE = 0.15  # relative distance of the run's own student from a size's target that counts as that size
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
COLORS = {"anneal@slimflow": "tab:blue", "anneal@reflow": "tab:orange", "distill@fgd": "tab:green",
          "distill@naive-paper": "tab:red", "distill@naive": "tab:purple"}  # fmt: skip
BASELINE = "distill@naive"  # the strongest fair baseline: the compute-matched naive student
SIZE_KEYS = ("fraction", "width", "params", "params_ratio")
RESULTS_PLOT = RESULTS / "capacity.png"


def sizes(params: dict[str, Any], shape: tuple[int, ...], classes: int, teacher: int) -> list[tuple[float, int, int]]:
    """(fraction, width, parameters) of each student size; a net kind without a width gives none, and a width
    that two fractions share (tiny teachers) is kept once. A size the run's own student is within
    REUSE_TOLERANCE of gets the run's own width, so that its trained students are that point."""
    net = params["anneal"]["net"]
    own = net_params(net, shape, classes) if net["kind"] in ("mlp", "resmlp") else None
    out = []
    for fraction in FRACTIONS:
        target = fraction * teacher
        if own is not None and abs(own - target) <= REUSE_TOLERANCE * target:
            width: int | None = net["width"]
        else:
            width = width_for(net, shape, classes, target, widest=max(64, 8 * net["width"]))
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
    """Left: FD at one step against student parameters, one line per method (mean over seeds, bars ± std),
    the teacher (dopri5) for reference. Right: each distilled student's FD minus the compute-matched naive
    student's, per seed then averaged — below zero is where a method pays off against that baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    means = seed_means(rows)
    params_of = {r["fraction"]: r["params"] for r in means}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model, label in LABELS.items():
        points = sorted((r["params"], r["fd_mean"], r["fd_std"]) for r in means if r["model"] == model)
        if points:
            x, y, err = zip(*points, strict=True)
            left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, color=COLORS[model],
                          linestyle="--" if model.startswith("anneal") else "-")  # fmt: skip
    left.axhline(
        teacher["fd"], color="grey", linestyle=":", label=f"teacher, {teacher['sampler']} ({teacher['nfe']:.0f} NFE)"
    )
    left.set_yscale("log")
    left.yaxis.set_major_formatter(plain), left.yaxis.set_minor_formatter(plain)
    left.set_ylabel("FD (one step; log scale, lower is better)")
    left.set_title("FD at one step vs student size")
    left.legend(fontsize=8, loc="upper right")
    for model in ("distill@fgd", "distill@naive-paper"):
        deltas = paired_deltas(rows, model, BASELINE)
        points = sorted((params_of[f], *mean_std(d)) for f, d in deltas.items())
        if points:
            x, y, err = zip(*points, strict=True)
            right.errorbar(x, y, yerr=err, marker="o", capsize=3, color=COLORS[model], label=LABELS[model])
    right.axhline(0.0, color=COLORS[BASELINE], label=f"{LABELS[BASELINE]} (zero line)")
    right.set_ylabel(f"FD − {LABELS[BASELINE]} (below 0: better)")
    right.set_title("against the compute-matched naive student")
    right.legend(fontsize=8)
    seeds = max((r["seeds"] for r in means), default=0)
    for ax in (left, right):
        ax.set_xscale("log")
        sizes_shown = sorted({(r["params"], r["params_ratio"]) for r in means})
        ax.set_xticks([n for n, _ in sizes_shown], [f"{n / 1000:.0f}k\n{q:.0%}" for n, q in sizes_shown])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("student parameters (log scale; % of the teacher's)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Student capacity sweep: {seeds} training seed{'s' * (seeds != 1)}, bars ± std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(ctx: Context, source: Path, index: int) -> list[dict[str, Any]]:
    """One run's rows: every size's five students, trained in copies (or the run's own, at its own size)."""
    from pipeline.data import load_split
    from pipeline.modelio import load_model
    from pipeline.nets import count_params

    params = yaml.safe_load((source / "params.yaml").read_text())
    train_split = load_split(source / "data").train
    teacher_params = count_params(load_model(source / "models" / "teacher").net)
    own_width = params["anneal"]["net"].get("width")
    jobs: list[tuple[dict[str, Any], str, Path, Variant | None]] = []
    for fraction, width, n in sizes(params, train_split.shape, train_split.num_classes, teacher_params):
        size = {"fraction": fraction, "width": width, "params": n, "params_ratio": n / teacher_params}
        for job, commands in JOBS.items():
            if width == own_width and not ctx.quick:
                jobs.append((size, job, source, None))
                continue
            variant = Variant(f"capacity-{index}-{width}-{job}", edits(params, width, ctx.quick), MODELS[job][0],
                              False, commands, rebuilt=MODELS[job][1:])  # fmt: skip
            copy = ctx.workdir / variant.name
            prepare(source, copy, variant)
            jobs.append((size, job, copy, variant))
    todo = sorted((j for j in jobs if j[3] is not None), key=lambda j: -j[0]["params"] * len(j[3].commands))
    with ThreadPoolExecutor(max_workers=2) as pool:  # the largest nets first
        walls = dict(zip((j[2] for j in todo), pool.map(lambda j: train(j[2], j[3], threads=ctx.threads), todo),
                         strict=True))  # fmt: skip
    scored = [(size, job, where, m) for size, job, where, _ in jobs for m in MODELS[job]]
    fds = score(source, [where / "models" / m for _, _, where, m in scored])  # one reference for all of them
    rows = [{"run": source.name, "seed": params["distill"]["seed"], **size, "model": m, "fd": fd,
             "job_train_s": round(walls[where], 1) if where in walls else "the run's own"}
            for (size, _, where, m), fd in zip(scored, fds, strict=True)]  # fmt: skip
    return sorted(rows, key=lambda r: (r["params"], list(LABELS).index(r["model"])))


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per size and method: FD mean ± std over the runs (training seeds) and the per-seed values."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*(r[k] for k in SIZE_KEYS), r["model"]), []).append(r)
    out = []
    for (*size, model), group in groups.items():
        mean, std = mean_std([r["fd"] for r in group])
        out.append({**dict(zip(SIZE_KEYS, size, strict=True)), "model": model, "fd_mean": mean, "fd_std": std,
                    "seeds": len(group), "per_seed": "; ".join(f"{r['fd']:.4g}" for r in group)})  # fmt: skip
    return sorted(out, key=lambda r: (r["params"], list(LABELS).index(r["model"])))


def paired_deltas(rows: list[dict[str, Any]], method: str, baseline: str) -> dict[float, list[float]]:
    """Per size: method − baseline FD in every run that has both (one value per training seed)."""
    fd = {(r["run"], r["fraction"], r["model"]): r["fd"] for r in rows}
    out: dict[float, list[float]] = {}
    for run, fraction in dict.fromkeys((r["run"], r["fraction"]) for r in rows):
        if (run, fraction, method) in fd and (run, fraction, baseline) in fd:
            out.setdefault(fraction, []).append(fd[(run, fraction, method)] - fd[(run, fraction, baseline)])
    return out


def fgd_versus_naive(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: FGD − each naive reading, per seed, as mean ± std and a verdict (lower FD is better)."""
    out = []
    for baseline in ("distill@naive-paper", "distill@naive"):
        for fraction, deltas in paired_deltas(rows, "distill@fgd", baseline).items():
            mean, std = mean_std(deltas)
            out.append({"fraction": fraction, "baseline": baseline, "fgd_minus_baseline": mean, "std": std,
                        "fgd_better": f"{sum(d < 0 for d in deltas)}/{len(deltas)}",
                        "verdict": verdict(deltas, sign=-1)})  # fmt: skip
    return sorted(out, key=lambda r: (r["fraction"], r["baseline"] != "distill@naive-paper"))


def report_of(rows: list[dict[str, Any]], teacher: dict[str, Any], settings: dict[str, Any]) -> Report:
    import pandas as pd

    report = Report()
    means = seed_means(rows)
    plot = RESULTS_PLOT
    capacity_plot(rows, teacher, plot)
    report.tables["student capacity: FD at one step, mean ± std over training seeds"] = means
    wide = pd.DataFrame(means).pivot_table(index=["fraction", "width", "params"], columns="model", values="fd_mean")
    report.tables["mean FD by size (columns: methods)"] = wide.reset_index().to_dict("records")
    comparisons = fgd_versus_naive(rows)
    report.tables["FGD − naive at each size (per-seed differences; lower FD is better)"] = comparisons
    report.tables["every run, size and method"] = rows
    for c in comparisons:
        name = c["baseline"].split("@")[1]
        report.summary[f"FGD − {name} FD at {c['fraction']:.0%} of the teacher"] = c["fgd_minus_baseline"]
    report.figures.update({"rows": rows, "means": means, "teacher": teacher, "plot": str(plot)})
    report.settings.update(settings)
    report.notes.append("every model at one step (the 2-flows: one Euler step), the eval stage's reference "
                        "and noise; teacher and pairs are each run's, its training seed its distill.seed")  # fmt: skip
    return report


def run(ctx: Context) -> Report:
    import pandas as pd

    from pipeline.modelio import load_model
    from pipeline.nets import count_params

    sources = ctx.runs or [ctx.repo or ctx.smoke_run]
    first = sources[0]
    params = yaml.safe_load((first / "params.yaml").read_text())
    board = pd.read_csv(first / "reports" / "leaderboard.csv")
    teacher_rows = board[(board["model"] == "teacher") & board["sampler"].str.startswith("dopri5")]
    teacher = {"fd": float("nan"), "sampler": "?", "nfe": 0}
    if len(teacher_rows):
        teacher = teacher_rows.iloc[-1][["sampler", "nfe", "fd"]].to_dict()
    steps = {k: v for k, v in edits(params, 0, ctx.quick).items() if k != "anneal.net"} or "the run's own"
    settings = {"runs": [str(s) for s in sources], "fractions": list(FRACTIONS), "steps": steps,
                "teacher_params": count_params(load_model(first / "models" / "teacher").net)}  # fmt: skip
    started, rows = time.perf_counter(), []
    for index, source in enumerate(sources):
        rows += sweep(ctx, source, index)
        report = report_of(rows, teacher, {**settings, "runs_done": index + 1})
        if index + 1 < len(sources):  # the runner writes the final file; this one keeps finished seeds safe
            wall = time.perf_counter() - started
            write_result(ctx.results / "capacity.json", result_payload("capacity", ctx.mode, ctx.seed, wall, report))
    report.settings["train_and_score_s"] = round(time.perf_counter() - started, 1)
    if not ctx.runs and not ctx.repo:
        report.notes.append("no --runs / --repo: a smoke-profile run (tiny nets); its curves say nothing about digits")
    return report
