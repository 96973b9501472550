"""The runner's adapter for benchmarks/threebody.py (the RL step-size paper's own testbed): its main() runs as is,
its result goes into the common schema (benchmarks/results/threebody.json) with its table and headline figures."""

from __future__ import annotations

from benchmarks import threebody
from benchmarks.common import Report
from benchmarks.context import Context


def run(ctx: Context) -> Report:
    raw = ctx.workdir / "threebody-raw.json"
    result = threebody.main([*(["--quick"] if ctx.quick else []), "--seed", str(ctx.seed), "--out", str(raw)])
    report = Report(
        settings={
            "config": result["config"],
            "dqn": result["dqn"],
            "train_ic_seeds": result["train_ic_seeds"],
            "heldout_ic_seeds": result["heldout_ic_seeds"],
        }
    )
    report.tables["three-body: RL vs every fixed IAS15 epsilon (held-out initial conditions)"] = result["table"]
    report.figures = {
        "table": result["table"],
        "train_seconds": result["train_seconds"],
        "rl_epsilon_choices": result["rl_epsilon_choices"],
        "per_ic": result["per_ic"],
        "machine_threebody": result["machine"],
    }
    rl = result["table"][0]
    best = max(result["table"][1:], key=lambda row: row["mean_return"])
    report.summary = {
        "RL mean return − best fixed epsilon's": rl["mean_return"] - best["mean_return"],
        "RL mean IAS15 steps ÷ best fixed epsilon's": rl["mean_steps"] / best["mean_steps"],
    }
    report.notes.append(f"best fixed epsilon by mean return: {best['solver']}; costs are IAS15 steps, not seconds")
    return report
