"""Seed paper's testbed: a DQN picks IAS15's epsilon per interval vs every fixed epsilon, on held-out initial
conditions. Cost = IAS15 steps; accuracy = final relative energy error.

    python benchmarks/threebody.py --quick     # <= 60 s
    python benchmarks/threebody.py             # full, <= 5 min

Prints a table, writes benchmarks/results/threebody.json (machine, versions, seed, every figure), and ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_write_text
from pipeline.stepsize import run_episode, train_policy
from pipeline.stepsize.threebody import ThreeBodyConfig, ThreeBodyEnv

MODES = {
    "quick": {"timesteps": 6_000, "heldout": 12},
    "full": {"timesteps": 50_000, "heldout": 60},
}
TRAIN_SEEDS, HELDOUT_START = range(0, 10_000), 1_000_000  # disjoint initial-condition seeds
DQN = {"net_arch": (64, 64), "learning_starts": 200}


def recorded(act: Callable[[np.ndarray], int], actions: list[int]) -> Callable[[np.ndarray], int]:
    """`act` that also appends each action it takes to `actions`."""

    def recording(obs: np.ndarray) -> int:
        actions.append(act(obs))
        return actions[-1]

    return recording


def evaluate(env: ThreeBodyEnv, act: Callable[[np.ndarray], int], ic_seeds: list[int]) -> list[dict]:
    """One record per initial condition: log10 energy error, IAS15 steps, return, wall time, actions taken."""
    records = []
    for ic_seed in ic_seeds:
        actions: list[int] = []
        start = time.perf_counter()
        total, info = run_episode(env, recorded(act, actions), options={"ic_seed": ic_seed})
        records.append({
            "ic_seed": ic_seed,
            "log10_energy_error": float(np.log10(max(info["energy_error"], 1e-16))),
            "steps": int(info["steps_total"]),
            "return": total,
            "wall_ms": 1e3 * (time.perf_counter() - start),
            "stalled": bool(info["stalled"]),
            "actions": actions,
        })  # fmt: skip
    return records


def summarise(name: str, records: list[dict]) -> dict:
    err = np.array([r["log10_energy_error"] for r in records])
    return {
        "solver": name,
        "mean_log10_err": float(err.mean()),
        "median_log10_err": float(np.median(err)),
        "worst_log10_err": float(err.max()),
        "mean_steps": float(np.mean([r["steps"] for r in records])),
        "mean_return": float(np.mean([r["return"] for r in records])),
        "mean_wall_ms": float(np.mean([r["wall_ms"] for r in records])),
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "versions": {p: version(p) for p in ("torch", "stable-baselines3", "gymnasium", "rebound", "numpy")},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run, <= 60 s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "threebody.json")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    torch.set_num_threads(1)
    config = ThreeBodyConfig()
    heldout = list(range(HELDOUT_START, HELDOUT_START + settings["heldout"]))

    # Train.
    start = time.perf_counter()
    dqn_settings = {k: v for k, v in DQN.items() if k != "net_arch"}
    policy = train_policy(
        ThreeBodyEnv(config, TRAIN_SEEDS), settings["timesteps"], args.seed, DQN["net_arch"], **dqn_settings
    )
    train_s = time.perf_counter() - start

    # Evaluate: warm up once, then RL and every fixed epsilon on the same held-out initial conditions.
    env = ThreeBodyEnv(config, heldout)
    evaluate(env, policy.act, heldout[:1])
    runs = {"rl": evaluate(env, policy.act, heldout)}
    for index, epsilon in enumerate(env.action_values):
        runs[f"eps={epsilon:.0e}"] = evaluate(env, lambda obs, a=index: a, heldout)
    table = [summarise(name, records) for name, records in runs.items()]

    # Report.
    print(
        f"three-body, {mode}: DQN {settings['timesteps']} steps, {train_s:.1f} s; {len(heldout)} held-out ICs"
    )
    columns = (
        "mean_log10_err",
        "median_log10_err",
        "worst_log10_err",
        "mean_steps",
        "mean_return",
        "mean_wall_ms",
    )
    print(f"{'solver':<10}" + "".join(f"{c:>17}" for c in columns))
    for row in table:
        print(f"{row['solver']:<10}" + "".join(f"{row[c]:>17.2f}" for c in columns))
    picks = Counter(a for r in runs["rl"] for a in r["actions"])
    rl_eps = {f"{env.action_values[a]:.0e}": n for a, n in sorted(picks.items())}
    print(f"RL epsilon choices: {rl_eps}")
    result = {
        "benchmark": "threebody",
        "mode": mode,
        "seed": args.seed,
        "machine": machine(),
        "config": asdict(config),
        "dqn": {
            "total_timesteps": settings["timesteps"],
            **policy.spec.train,
            "net_arch": list(DQN["net_arch"]),
        },
        "train_seconds": train_s,
        "train_ic_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop],
        "heldout_ic_seeds": heldout,
        "table": table,
        "rl_epsilon_choices": rl_eps,
        "per_ic": runs,
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    best_fixed = max(table[1:], key=lambda row: row["mean_return"])
    summary = {
        "benchmark": "threebody",
        "mode": mode,
        "rl_mean_return": table[0]["mean_return"],
        "rl_mean_log10_err": table[0]["mean_log10_err"],
        "rl_mean_steps": table[0]["mean_steps"],
        "best_fixed": best_fixed["solver"],
        "best_fixed_mean_return": best_fixed["mean_return"],
        "train_seconds": round(train_s, 1),
    }
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
