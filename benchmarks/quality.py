"""Benchmark 5, quality: the paper-claims table from finished runs, and the FD–NFE–size plot.

Reads `reports/leaderboard.csv` and `metrics/stepper.json` of each run given with `--runs` (one per training
seed: the table shows mean ± std over them). Without runs it uses one smoke chain built in a temp project and
says so: smoke nets are tiny and barely trained, so its signs say nothing about the digits profile.

Each row: the claim, the paper's number, the baseline and the method (ours), their difference and whether
its sign is the paper's. Claims the default chain cannot measure (they need `dvc exp run` variants) are
listed as not measured rather than left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from benchmarks.common import RESULTS, Report
from benchmarks.context import Context
from benchmarks.diagnostics import add_diagnostics


@dataclass
class RunData:
    path: Path
    board: pd.DataFrame
    stepper: dict[str, Any] | None
    ablations: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> {"fd", "train_s"}

    @classmethod
    def load(cls, path: Path) -> RunData:
        stepper = path / "metrics" / "stepper.json"
        return cls(path, pd.read_csv(path / "reports" / "leaderboard.csv"),
                   json.loads(stepper.read_text()) if stepper.exists() else None)  # fmt: skip


Pair = tuple[float | None, float | None]  # (baseline, method) in one run


@dataclass
class Claim:
    claim: str
    paper: str
    metric: str
    baseline: str
    method: str
    better: Literal["lower", "higher"]
    extract: Callable[[RunData], Pair] | None = None  # None: not measured by the default chain
    needs: str = ""


def value(board: pd.DataFrame, model: str, column: str, sampler: str | None = None) -> float | None:
    """`column` of the model's row at `sampler` (a prefix such as "dopri5" takes the model's last such row)."""
    rows = board[board["model"] == model]
    if sampler is not None:
        rows = rows[rows["sampler"] == sampler] if "-" in sampler or sampler == "onestep" else \
            rows[rows["sampler"].str.startswith(sampler)]  # fmt: skip
    if rows.empty or pd.isna(rows[column].iloc[-1]):
        return None
    return float(rows[column].iloc[-1])


def _fd(model_a: str, model_b: str, sampler: str) -> Callable[[RunData], Pair]:
    return lambda r: (value(r.board, model_a, "fd", sampler), value(r.board, model_b, "fd", sampler))


def _ablation(baseline: str | None, method: str | None, model: str = "distill@fgd") -> Callable[[RunData], Pair]:
    """FD of ablation variants (benchmarks/ablations.py); None stands for the run's own `model` (one step)."""

    def fd(r: RunData, name: str | None) -> float | None:
        if name is None:
            return value(r.board, model, "fd", "onestep") if r.ablations else None
        return r.ablations[name]["fd"] if name in r.ablations else None

    return lambda r: (fd(r, baseline), fd(r, method))


def _straightness(model: str) -> Callable[[RunData], Pair]:
    return lambda r: (value(r.board, "teacher", "straightness"), value(r.board, model, "straightness"))


def _stepper(setting: str, column: str) -> Callable[[RunData], Pair]:
    """`column` of a fixed solver's row in the stepper's NFE-error table (metrics/stepper.json) and of the RL row."""

    def extract(r: RunData) -> Pair:
        row = (r.stepper or {}).get("table", {}).get(setting)
        if row is None or "rl" not in r.stepper:  # type: ignore[operator]
            return None, None
        return float(row[column]), float(r.stepper["rl"][column])  # type: ignore[index]

    return extract


ABLATIONS = "full mode (`slimstep bench` without --quick): it re-runs the student stages (benchmarks/ablations.py)"
CLAIMS = [
    Claim("reflow straightens the flow", "2-RF straighter than 1-RF (Rectified Flow)", "straightness S",
          "teacher", "anneal@reflow", "lower", _straightness("anneal@reflow")),
    Claim("annealed reflow straightens the flow", "2-RF straighter than 1-RF (Rectified Flow)", "straightness S",
          "teacher", "anneal@slimflow", "lower", _straightness("anneal@slimflow")),
    Claim("annealing beats plain reflow (2-flow, dopri5)", "FID 5.84 → 5.46 (CIFAR-10, 15.7M)", "FD, dopri5",
          "anneal@reflow", "anneal@slimflow", "lower", _fd("anneal@reflow", "anneal@slimflow", "dopri5")),
    Claim("annealing beats plain reflow (2-flow, 1 Euler step)", "– (lower expected)", "FD, euler-1",
          "anneal@reflow", "anneal@slimflow", "lower", _fd("anneal@reflow", "anneal@slimflow", "euler-1")),
    Claim("flow-guided distillation beats naive distillation (paper's reading)",
          "FID 12.09 (naive) → 7.30 (L2 FGD) (CIFAR-10, 15.7M)", "FD, one step", "distill@naive-paper", "distill@fgd",
          "lower", _fd("distill@naive-paper", "distill@fgd", "onestep")),
    Claim("flow-guided distillation beats naive distillation (compute-matched)", "– (not in the paper)",
          "FD, one step", "distill@naive", "distill@fgd", "lower",
          _fd("distill@naive", "distill@fgd", "onestep")),
    Claim("2-step guidance term on vs off (same init, teacher pairs)", "FID 7.90 → 7.30 (L2), 6.43 → 5.81 (LPIPS)",
          "FD, one step", "term off", "term on", "lower", _ablation("term_off", None), ABLATIONS),
    Claim("2-step guidance term on vs off (same init, regenerated pairs)", "FID 7.90 → 7.30 (L2, 2-RF data)",
          "FD, one step", "term off, regen pairs", "term on, regen pairs", "lower",
          _ablation("regen_off", "regen_on"), ABLATIONS),
    Claim("regenerated pairs beat teacher pairs (FGD, term on)", "– (the paper trains on 2-RF data)", "FD, one step",
          "teacher pairs (distill@fgd)", "regen pairs", "lower", _ablation(None, "regen_on"), ABLATIONS),
    Claim("2-RF data + init beats naive distillation (paper's reading; term off)", "FID 12.09 → 7.90",
          "FD, one step", "distill@naive-paper", "term off, regen pairs", "lower",
          _ablation(None, "regen_off", "distill@naive-paper"), ABLATIONS),
    Claim("FGD on regenerated pairs beats naive (paper's reading)", "FID 12.09 → 7.30 (L2)", "FD, one step",
          "distill@naive-paper", "term on, regen pairs", "lower", _ablation(None, "regen_on", "distill@naive-paper"),
          ABLATIONS),
    Claim("MeanFlow (data only, no teacher) beats naive distillation at equal steps", "– (CIFAR-10 1-NFE FID 2.92,"
          " arXiv 2505.13447; no distillation baseline)", "FD, one step", "distill@naive", "meanflow", "lower",
          _fd("distill@naive", "meanflow", "onestep")),
    Claim("MeanFlow (data only, no teacher) beats FGD", "– (not compared in either paper)", "FD, one step",
          "distill@fgd", "meanflow", "lower", _fd("distill@fgd", "meanflow", "onestep")),
    Claim("MSD ensemble beats one student of the same size", "FID 1.28 → 1.20 (ImageNet-64, 4 students)",
          "FD, one step", "distill@fgd", "msd@ensemble", "lower", _fd("distill@fgd", "msd@ensemble", "onestep")),
    Claim("more MSD students help (K = 1 vs 5)", "FID 2.60 / 2.49 / 2.37 for K = 1/2/4 (unconfirmed)",
          "FD, one step", "K = 1 (distill@fgd)", "K = 5", "lower", _ablation(None, "msd_k5"), ABLATIONS),
    Claim("TSM warm start helps half-size students", "FID 11.67 → 2.88", "FD, one step",
          "no TSM, compute-matched", "TSM", "lower", _ablation("tsm_off", "tsm_on"), ABLATIONS),
    *(Claim(f"more DMD2 students help (K = 1 vs {k}, GAN phase on)", "FID 2.60 / 2.49 / 2.37 for K = 1/2/4 "
            "(unconfirmed)", "FD, one step", "K = 1 (dmd_k1)", f"K = {k} (dmd_k{k})", "lower",
            _ablation("dmd_k1", f"dmd_k{k}"), ABLATIONS) for k in (2, 4)),
    *(Claim(f"the GAN phase improves DMD2 students (K = {k})", "– (DMD2 adds it last; not checked here)",
            "FD, one step", "before the GAN phase", "after it", "lower",
            _ablation(f"dmd_k{k}_before_gan", f"dmd_k{k}"), ABLATIONS) for k in (1, 2, 4)),
    Claim("RL step control needs fewer NFE than dopri5", "learned steps beat fixed ones at equal accuracy (§6)",
          "NFE per solve", "dopri5 1e-04 (pairs)", "rl", "lower", _stepper("dopri5-0.0001", "nfe")),
    Claim("RL step control is as accurate as dopri5", "learned steps beat fixed ones at equal accuracy (§6)",
          "pair RMSE vs 1e-7 reference", "dopri5 1e-04 (pairs)", "rl", "lower", _stepper("dopri5-0.0001", "err")),
]  # fmt: skip


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4g}" if not std else f"{mean:.4g} ± {std:.2g}"


def verdict(deltas: list[float], sign: int) -> str:
    """ "reproduces" / "does not" when the mean difference is beyond 2 standard errors over runs, else "inside the
    noise"; one run has no seed-to-seed noise estimate, so its verdict says so."""
    mean, std = mean_std(deltas)
    if len(deltas) < 2:
        return f"{'reproduces' if mean * sign > 0 else 'does not'} (1 seed: noise unknown)"
    if abs(mean) <= 2 * std / math.sqrt(len(deltas)):
        return "inside the noise"
    return "reproduces" if mean * sign > 0 else "does not"


def claim_row(claim: Claim, runs: list[RunData]) -> dict[str, Any]:
    """One table row: baseline, method and their difference as mean ± std over runs; whether the sign holds."""
    row: dict[str, Any] = {"claim": claim.claim, "paper": claim.paper, "metric": claim.metric,
                           "baseline": claim.baseline, "method": claim.method}  # fmt: skip
    pairs = [p for p in (claim.extract(r) for r in runs) if None not in p] if claim.extract else []
    if not pairs:
        why = claim.needs or "the runs lack these rows"
        return {**row, "ours_baseline": "–", "ours_method": "–", "delta": "–", "reproduces": "not measured",
                "runs": f"0/{len(runs)}", "why": why, "values": [], "per_seed": "–",
                "verdict": "not measured"}  # fmt: skip
    sign = -1 if claim.better == "lower" else 1
    deltas = [b - a for a, b in pairs]
    delta_mean, delta_std = mean_std(deltas)
    holds = [d * sign > 0 for d in deltas]
    return {
        **row,
        "ours_baseline": pm(*mean_std([a for a, _ in pairs])),
        "ours_method": pm(*mean_std([b for _, b in pairs])),
        "delta": pm(delta_mean, delta_std),
        "reproduces": "yes" if delta_mean * sign > 0 else "no",
        "runs": f"{sum(holds)}/{len(pairs)}",
        "why": "",
        "values": [list(p) for p in pairs],
        "per_seed": "; ".join(f"{a:.4g} → {b:.4g}" for a, b in pairs),
        "verdict": verdict(deltas, sign),
    }


def threebody_row() -> dict[str, Any] | None:
    """The seed paper's own testbed from benchmarks/results/threebody.json, when present."""
    path = RESULTS / "threebody.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    table = result["figures"]["table"] if "figures" in result else result["table"]  # runner schema or the script's
    rl = next(r for r in table if r["solver"] == "rl")
    best = max((r for r in table if r["solver"] != "rl"), key=lambda r: r["mean_return"])
    delta = rl["mean_return"] - best["mean_return"]
    return {"claim": "RL step control beats every fixed IAS15 epsilon (three-body)",
            "paper": "DQN-chosen step parameter beats fixed ones (arXiv 2502.12809)",
            "metric": "mean return (−log err − λ·steps)", "baseline": f"best fixed ({best['solver']})",
            "method": "rl", "ours_baseline": f"{best['mean_return']:.4g}", "ours_method": f"{rl['mean_return']:.4g}",
            "delta": f"{delta:.4g}", "reproduces": "yes" if delta > 0 else "no", "runs": "1/1" if delta > 0 else "0/1",
            "why": f"benchmarks/results/threebody.json ({result['mode']}, {result.get('created', 'earlier run')})",
            "values": [[best["mean_return"], rl["mean_return"]]], "per_seed": "–",
            "verdict": verdict([delta], 1)}  # fmt: skip


def one_point_per_model(runs: list[RunData]) -> tuple[pd.DataFrame, float | None]:
    """Leaderboard rows averaged over runs, one per model at its own sampler (one step, the flow's default
    sampler from its meta.json, else its last dopri5 row); and the real-data floor."""
    board = pd.concat([r.board.assign(run=i) for i, r in enumerate(runs)])
    numeric = board.groupby(["model", "sampler"], sort=False)[["nfe", "fd", "params"]].mean()
    spread_ = board.groupby(["model", "sampler"], sort=False)["fd"].std(ddof=1) if len(runs) > 1 else \
        board.groupby(["model", "sampler"], sort=False)["fd_std"].mean()  # fmt: skip
    merged = numeric.assign(fd_std=spread_.fillna(0.0)).reset_index()
    floor = merged.loc[merged["model"] == "real", "fd"]
    chosen = []
    for model, group in merged[merged["model"] != "real"].groupby("model", sort=False):
        meta = runs[0].path / "models" / model / "meta.json"
        default = json.loads(meta.read_text()).get("default_sampler") if meta.exists() else None
        for pick in (group["sampler"] == "onestep", group["sampler"] == (default or ""),
                     group["sampler"].str.startswith("dopri5")):  # fmt: skip
            if pick.any():
                chosen.append(group[pick].iloc[-1])
                break
        else:
            chosen.append(group.iloc[-1])
    return pd.DataFrame(chosen).reset_index(drop=True), (float(floor.iloc[0]) if len(floor) else None)


def stored_ablations(paths: list[Path], rerun: set[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{run: {variant: result}} from the stored quality.json, for these runs and the variants not re-run now.

    `--variants` re-runs a few ablations; the claims of the others keep their last measurement."""
    stored = RESULTS / "quality.json"
    if not stored.exists():
        return {}
    rows = json.loads(stored.read_text())["tables"].get("ablations (student stages re-run in copies of the runs)", [])
    wanted, out = {str(p) for p in paths}, {}
    for row in rows:
        variant = row["variant"].removesuffix("_before_gan")
        if row["run"] in wanted and variant not in rerun:
            out.setdefault(row["run"], {})[row["variant"]] = {"fd": row["fd"], "train_s": row["train_s"]}
    return out


def run(ctx: Context) -> Report:
    from pipeline.plots import quality_vs_nfe

    report = Report()
    paths = ctx.runs
    if not paths:
        paths = [ctx.smoke_run]
        report.notes.append(
            "no --runs given: ONE smoke-profile run (tiny nets, few steps); its signs say nothing about "
            "the digits profile — pass --runs with 3 finished digits runs (training seeds)"
        )
    runs = [RunData.load(p) for p in paths]
    if not ctx.quick:
        from benchmarks.ablations import run_ablations

        measured = run_ablations(paths, ctx.workdir, only=ctx.variants)
        kept = stored_ablations(paths, set(ctx.variants)) if ctx.variants else {}
        for r in runs:
            r.ablations = {**kept.get(str(r.path), {}), **measured[r.path]}
        if kept:
            report.notes.append("ablations not in --variants are the stored quality.json's for the same runs")
        report.tables["ablations (student stages re-run in copies of the runs)"] = [
            {"run": str(r.path), "variant": name, **result} for r in runs for name, result in r.ablations.items()
        ]
    rows = [claim_row(c, runs) for c in CLAIMS]
    extra = threebody_row()
    if extra:
        rows.append(extra)
    report.figures["claims"] = rows
    columns = ["claim", "paper", "metric", "baseline", "ours_baseline", "method", "ours_method", "delta",
               "reproduces", "runs", "per_seed", "verdict"]  # fmt: skip
    report.tables["paper claims"] = [{k: r[k] for k in columns} for r in rows]
    missing = [f"{r['claim']}: {r['why']}" for r in rows if r["reproduces"] == "not measured"]
    report.notes += [f"not measured — {m}" for m in missing]
    measured = [r for r in rows if r["reproduces"] in ("yes", "no")]
    report.summary["claims whose sign reproduces"] = (
        f"{sum(r['reproduces'] == 'yes' for r in measured)}/{len(measured)}"
    )

    add_diagnostics(report, paths)
    points, floor = one_point_per_model(runs)
    quality_vs_nfe(points, RESULTS / "quality_nfe.png", floor=floor)
    report.tables["quality vs NFE (plotted)"] = [
        {"model": p["model"], "sampler": p["sampler"], "nfe": p["nfe"], "params": int(p["params"]),
         "fd": p["fd"], "fd_std": p["fd_std"]} for _, p in points.iterrows()
    ]  # fmt: skip
    report.figures.update({"real_floor_fd": floor, "plot": "benchmarks/results/quality_nfe.png"})
    report.settings.update({"runs": [str(p) for p in paths], "n_runs": len(runs)})
    if any(math.isnan(p) for p in points["fd"]):
        report.notes.append("some plotted rows have no FD")
    return report
