"""Benchmark 2, pair generation: NFE and pairs/s per solver, disk bytes per pair, peak RAM while training on pairs.

Solvers run `pipeline.pairs.generate_pairs` (the `pairs` stage's own code) on the same noise, interleaved;
pairs/s is a ratio to the default pair solver (dopri5 1e-04). Without `--repo` the teacher is an untrained
digits-sized net and dopri5 is replaced by Euler with the NFE measured on the trained teachers.

Peak RAM: synthetic 3×32×32 pair stores of 1× and 10× the pairs (same shard size), one subprocess per
configuration (RSS high-water is per process), training a tiny net for one pass over the store through the
streaming PairStream or, as the negative control, an all-in-RAM loader (torch.cat of every shard).
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Report, interleave, median, paired_ratio
from benchmarks.context import Context
from benchmarks.memprobe import probe
from benchmarks.sampling import CLASSES, DOPRI5_NFE, SHAPE, trained_models, untrained_models

REFERENCE = "dopri5-1e-04"  # the digits profile's pair solver
RAM_SHAPE = (3, 32, 32)
FLAT_WITHIN = 0.10  # issue 7: streaming peak RAM flat within 10 % from 1x to 10x pairs


def _rl_solver(repo: Path):  # noqa: ANN202 - a pairs.SolverFn or None
    from pipeline.stepsize import StepPolicy, rl_solve
    from pipeline.stepsize.policy import SPEC

    policy_dir = repo / "models" / "stepper"
    if not (policy_dir / SPEC).exists():
        return None

    policy = StepPolicy.load(policy_dir)
    return lambda v, z, label: rl_solve(policy, v, z, label)


def _synthetic_image(v, z, label):  # noqa: ANN001, ANN202 - a SolverFn: cheap, deterministic "teacher"
    from pipeline.flow import SampleResult

    return SampleResult(torch.tanh(z.flip(-1)), 0)


def solver_table(ctx: Context, report: Report, work: Path) -> None:
    from pipeline.pairs import generate_pairs

    trained = ctx.repo is not None
    teacher = (trained_models(ctx.repo) if trained else untrained_models())[0]
    n_pairs = 128 if ctx.quick else 1000
    solve_batch = n_pairs  # one solve batch: adaptive solvers' NFE depends on the batch, as in the stage
    # shown name -> (sampler name, solver_fn or None)
    solvers: dict[str, tuple[str, Any]] = {s: (s, None) for s in ("euler-4", "euler-16", "heun-4", "heun-16")}
    for name, nfe in DOPRI5_NFE.items():
        solvers[name] = (name, None) if trained else (f"euler-{nfe}", None)
    rl = _rl_solver(ctx.repo) if trained else None
    if rl is not None:
        solvers["rl"] = ("rl", rl)
    else:
        report.notes.append("no RL row: needs --repo with a trained models/stepper policy")
    if not trained:
        report.notes.append(
            f"untrained digits-sized teacher (no --repo): dopri5 rows run Euler at the measured NFE {DOPRI5_NFE}"
        )

    counter = itertools.count()
    stats: dict[str, Any] = {}

    def generate(name: str) -> Any:
        sampler, solver_fn = solvers[name]
        out = work / f"{name}-{next(counter)}"
        result = generate_pairs(teacher, out, n_pairs, n_pairs, solve_batch, sampler, ctx.seed, SHAPE, CLASSES,
                                solver_fn=solver_fn, progress=False)  # fmt: skip
        shutil.rmtree(out)
        return result

    fns = {name: (lambda name=name: generate(name)) for name in solvers}
    times = interleave(fns, repeats=ctx.repeats(5, 7), warmup=1, results=stats)
    rows = []
    for name, (sampler, _) in solvers.items():
        rows.append({
            "solver": name, "runs": sampler, "nfe_per_solve": stats[name].nfe_mean, "pairs": n_pairs,
            "pairs_per_s": n_pairs / median(times[name]),
            f"speed_vs_{REFERENCE}": paired_ratio(times[REFERENCE], times[name]),
        })  # fmt: skip
    report.tables["pair generation per solver"] = rows
    report.figures["solver_times_s"] = times
    report.settings.update({"n_pairs_timed": n_pairs, "solve_batch": solve_batch, "trained_teacher": trained})


def disk_table(ctx: Context, report: Report, work: Path) -> None:
    """Bytes per pair on disk, images in fp32 vs fp16 (noise is always stored exactly, fp32)."""
    from pipeline.pairs import generate_pairs

    rows = []
    for shape, n in ((SHAPE, 2000), (RAM_SHAPE, 500)):
        sizes = {}
        for fp16 in (False, True):
            out = work / f"disk-{'x'.join(map(str, shape))}-{fp16}"
            sizes[fp16] = generate_pairs(None, out, n, n, n, "synthetic", ctx.seed, shape, CLASSES, fp16=fp16,
                                         solver_fn=_synthetic_image, progress=False).bytes_per_pair  # fmt: skip
            shutil.rmtree(out)
        rows.append({"shape": "×".join(map(str, shape)), "fp32_bytes_per_pair": sizes[False],
                     "fp16_bytes_per_pair": sizes[True], "fp16_over_fp32": sizes[True] / sizes[False]})  # fmt: skip
    report.tables["disk per pair"] = rows


def ram_table(ctx: Context, report: Report, work: Path) -> None:
    from pipeline.pairs import generate_pairs

    # 1x already spans several shuffle buffers (2 shards each), so the stream is in its steady state at 1x.
    base, shard = (1000, 100) if ctx.quick else (2000, 200)
    stores = {}
    for scale in (1, 10):
        stores[scale] = work / f"ram-{scale}x"
        generate_pairs(None, stores[scale], base * scale, shard, shard, "synthetic", ctx.seed, RAM_SHAPE, CLASSES,
                       solver_fn=_synthetic_image, progress=False)  # fmt: skip
    rows, peaks = [], {}
    for loader, scale in itertools.product(("stream", "inram"), (1, 10)):
        out = probe({"target": "train", "store": str(stores[scale]), "loader": loader, "threads": ctx.threads})
        peaks[loader, scale] = out
        rows.append({"loader": loader, "pairs": out["n_pairs"], "store_mb": _mb(stores[scale]), "steps": out["steps"],
                     "baseline_mb": out["baseline_kb"] / 1024, "peak_mb": out["peak_kb"] / 1024,
                     "growth_mb": out["growth_kb"] / 1024})  # fmt: skip
    for scale in (1, 10):
        shutil.rmtree(stores[scale])
    report.tables["peak RAM while training (3×32×32 pairs)"] = rows
    for loader in ("stream", "inram"):
        ratio = peaks[loader, 10]["peak_kb"] / peaks[loader, 1]["peak_kb"]
        report.summary[f"peak RSS 10×/1× pairs, {loader}"] = ratio
        report.figures[f"peak_ratio_{loader}"] = ratio
        report.figures[f"growth_ratio_{loader}"] = peaks[loader, 10]["growth_kb"] / max(
            peaks[loader, 1]["growth_kb"], 1
        )
    stream, control = report.figures["peak_ratio_stream"], report.figures["peak_ratio_inram"]
    flat = is_flat(peaks["stream", 1]["peak_kb"], peaks["stream", 10]["peak_kb"])
    report.target("peak RAM 10×/1× pairs, streaming", stream, f"<= {1 + FLAT_WITHIN:g}", flat)
    grows = not is_flat(peaks["inram", 1]["peak_kb"], peaks["inram", 10]["peak_kb"])
    report.target("peak RAM 10×/1× pairs, all-in-RAM control (must grow)", control, f"> {1 + FLAT_WITHIN:g}", grows)
    report.settings.update({"ram_pairs": [base, 10 * base], "ram_shard_size": shard, "ram_shape": list(RAM_SHAPE)})


def is_flat(peak_1x: float, peak_10x: float, within: float = FLAT_WITHIN) -> bool:
    """The streaming claim: peak at 10x the pairs at most `within` above the peak at 1x."""
    return peak_10x <= (1 + within) * peak_1x


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run(ctx: Context) -> Report:
    report = Report()
    work = ctx.workdir / "pairs"
    work.mkdir(parents=True, exist_ok=True)
    solver_table(ctx, report, work)
    disk_table(ctx, report, work)
    ram_table(ctx, report, work)
    rows = report.tables["pair generation per solver"]
    for row in rows:
        if row["solver"] != REFERENCE:
            report.summary[f"pairs/s {row['solver']} ÷ {REFERENCE}"] = row[f"speed_vs_{REFERENCE}"]
    report.summary["fp16 ÷ fp32 bytes per pair (digits)"] = report.tables["disk per pair"][0]["fp16_over_fp32"]
    return report
