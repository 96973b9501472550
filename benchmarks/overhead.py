"""Benchmark 3, pipeline overhead: the `teacher` stage through `dvc repro` (MLflow logging, EMA, checkpoints) vs a
bare PyTorch loop with the same net, data and steps; no-op `dvc repro` and no-op `slimstep run` wall times.

In throw-away projects: a fresh one where the teacher section is the digits profile's teacher with a short run and
`dvc repro -f -s teacher` alternates with the bare loop (this may run while the shared smoke chain builds in the
background: both sides see the same load), then the no-ops in the finished smoke chain (absolute times, so only
once nothing else of ours runs). Two ratios: end to end (bare wall ÷ stage wall, start-up included) and in the loop (the
stage's steps/s from its MLflow step timestamps ÷ the bare loop's over the same steps). The fixed start-up
cost does not grow with the run, so the ratio for the digits teacher's full length is projected from both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import ROOT, Report, interleave, median, paired_ratio, spread
from benchmarks.context import Context, env, timed

TARGET_RATIO, TARGET_NOOP_S = 0.95, 1.5


def noop_times(ctx: Context, project: Path, report: Report) -> None:
    """No-op `dvc repro` (the chain is up to date) against `dvc status` and DVC's bare start-up, interleaved."""
    check = subprocess.run(["dvc", "status"], cwd=project, env=env(), capture_output=True, text=True)
    up_to_date = "up to date" in check.stdout
    if not up_to_date:
        report.notes.append(f"the smoke chain is not up to date before the no-op timing: {check.stdout[-300:]}")
    fns = {
        "dvc repro (no-op)": lambda: timed(["dvc", "repro"], project),
        "dvc status": lambda: timed(["dvc", "status"], project),
        "dvc --version": lambda: timed(["dvc", "--version"], project),
    }
    times = interleave(fns, repeats=ctx.repeats(5, 9), warmup=1)
    noop = median(times["dvc repro (no-op)"])
    report.tables["no-op wall times"] = [
        {"command": name, **{f"{k}_s" if k != "n" else k: v for k, v in spread(t).items()},
         "ratio_to_dvc_version": paired_ratio(t, times["dvc --version"])}
        for name, t in times.items()
    ]  # fmt: skip
    report.figures["noop_times_s"] = times
    report.summary["no-op dvc repro, s"] = noop
    report.target("no-op `dvc repro` wall time, s (smoke DAG)", noop, f"<= {TARGET_NOOP_S}", noop <= TARGET_NOOP_S)


def slimstep_run_noop(ctx: Context, project: Path, report: Report) -> None:
    """No-op `slimstep run` (the Prefect flow over the same up-to-date DAG), if the command exists."""
    if subprocess.run(["slimstep", "run", "--help"], cwd=project, env=env(), capture_output=True).returncode != 0:
        report.notes.append("no `slimstep run` command in this checkout: no-op flow time skipped")
        return
    repeats = ctx.repeats(1, 3)
    walls = [timed(["slimstep", "run", "--no-register"], project) for _ in range(repeats)]
    report.tables["no-op wall times"].append(
        {
            "command": "slimstep run --no-register (no-op)",
            **{f"{k}_s" if k != "n" else k: v for k, v in spread(walls).items()},
        }
    )
    report.figures["slimstep_run_noop_s"] = walls
    report.summary["no-op slimstep run, s"] = median(walls)
    report.notes.append(f"no-op `slimstep run`: {repeats} run(s) (a Prefect flow starts a temporary server each time)")


def _stage_rate(project: Path) -> dict[str, Any]:
    """The newest teacher run's in-loop steps/s from its train/loss timestamps (first to last logged step)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("slimstep")
    run = client.search_runs([experiment.experiment_id], "tags.`slimstep.stage` = 'teacher'",
                             order_by=["attribute.start_time DESC"], max_results=1)[0]  # fmt: skip
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    first, last = history[0], history[-1]
    return {
        "run_id": run.info.run_id,
        "window_steps": last.step - first.step,
        "window_steps_per_s": (last.step - first.step) / max((last.timestamp - first.timestamp) / 1e3, 1e-3),
    }


def stage_vs_bare(ctx: Context, project: Path, report: Report) -> None:
    from pipeline.config import Params

    digits = Params().teacher  # the schema defaults are the digits profile
    steps, log_every = (80, 20) if ctx.quick else (600, 100)
    section = digits.model_copy(update={"steps": steps, "log_every": log_every,
                                        "warmup_steps": min(digits.warmup_steps, steps // 3)})  # fmt: skip
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teacher"] = section.model_dump(mode="json")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    threads = {"SLIMSTEP_THREADS": str(ctx.threads)}
    bare_spec = {"data": str(project / "data"), "net": section.net.model_dump(mode="json"), "steps": steps,
                 "batch_size": section.batch_size, "lr": section.lr, "seed": section.seed, "log_every": log_every,
                 "threads": ctx.threads, "num_classes": 10}  # fmt: skip
    stage_rates: list[float] = []
    bare_runs: list[dict[str, Any]] = []

    def stage() -> None:
        timed(["dvc", "repro", "-f", "-s", "teacher"], project, threads)
        stage_rates.append(_stage_rate(project)["window_steps_per_s"])

    def bare() -> None:
        cmd = [sys.executable, "-m", "benchmarks.bare_teacher", json.dumps(bare_spec)]
        out = subprocess.run(cmd, cwd=ROOT, env=env({"PYTHONPATH": str(ROOT)}), capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bare teacher loop failed:\n{out.stderr[-2000:]}")
        bare_runs.append(json.loads(out.stdout.strip().splitlines()[-1]))

    repeats = ctx.repeats(5, 5)
    times = interleave({"stage": stage, "bare": bare}, repeats=repeats, warmup=0)
    # The rates are recorded in call order; interleave ran each fn once per repeat (no warm-up), so they pair up.
    bare_rates = [b["window_steps_per_s"] for b in bare_runs]
    end_to_end = paired_ratio(times["bare"], times["stage"])
    in_loop = paired_ratio(stage_rates, bare_rates)
    # Fixed cost = wall - steps at the in-loop rate. Projection, pair by pair: the same fixed costs around a
    # full-length loop at the measured rates; the median over pairs, like every other ratio here.
    stage_fixed = [w - steps / r for w, r in zip(times["stage"], stage_rates, strict=True)]
    bare_fixed = [w - steps / r for w, r in zip(times["bare"], bare_rates, strict=True)]
    full = digits.steps
    pairs = zip(stage_rates, stage_fixed, bare_rates, bare_fixed, strict=True)
    projected = median([(full / br + bf) / (full / sr + sf) for sr, sf, br, bf in pairs])
    stage_fixed, bare_fixed = median(stage_fixed), median(bare_fixed)
    report.tables["teacher stage vs bare loop"] = [
        {"run": "dvc repro -f -s teacher", "steps": steps, "wall_s": median(times["stage"]),
         "loop_steps_per_s": median(stage_rates), "fixed_s": stage_fixed},
        {"run": "bare PyTorch loop", "steps": steps, "wall_s": median(times["bare"]),
         "loop_steps_per_s": median(bare_rates), "fixed_s": bare_fixed},
    ]  # fmt: skip
    report.figures.update({"stage_wall_s": times["stage"], "bare_wall_s": times["bare"],
                           "stage_loop_steps_per_s": stage_rates, "bare_loop_steps_per_s": bare_rates,
                           "teacher_section": section.model_dump(mode="json")})  # fmt: skip
    report.summary.update({
        f"stage ÷ bare throughput, end to end ({steps} steps)": end_to_end,
        "stage ÷ bare throughput, in the loop": in_loop,
        f"stage ÷ bare throughput, projected to the digits teacher ({full} steps)": projected,
    })  # fmt: skip
    report.target(f"teacher stage ÷ bare loop throughput (projected to {full} steps from the measured loop rates "
                  "and fixed costs)", projected, f">= {TARGET_RATIO}", projected >= TARGET_RATIO)  # fmt: skip
    report.notes.append(
        f"stage vs bare: digits teacher net and batch, {steps} steps, {repeats} interleaved pairs, {ctx.threads} "
        "thread(s); the stage adds EMA, grad clipping, LR schedule, a checkpoint, MLflow logging every "
        f"{log_every} steps, DVC hashing and start-up"
    )


def run(ctx: Context) -> Report:
    report = Report()
    project = ctx.make_project("overhead")
    timed(["dvc", "repro", "data"], project)  # data, and the MLflow store created outside the timing
    report.settings["stage_vs_bare_alongside_smoke_chain"] = ctx.smoke_running()
    stage_vs_bare(ctx, project, report)
    try:
        smoke = ctx.smoke_run
    except RuntimeError as exc:  # keep the stage figures; say why the no-op ones are missing
        report.notes.append(f"no-op timings skipped: {str(exc).splitlines()[0]} (see the runner's output)")
        report.target("no-op `dvc repro` wall time, s (smoke DAG)", None, f"<= {TARGET_NOOP_S}", None)
        print(exc)
        return report
    noop_times(ctx, smoke, report)
    if ctx.quick:
        report.notes.append(
            "no-op `slimstep run` (a Prefect flow, ~10 s of temporary server start) is timed in full mode"
        )
    else:
        slimstep_run_noop(ctx, ctx.smoke_run, report)
    return report
