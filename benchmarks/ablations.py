"""The claims the default chain cannot measure: one stage re-run with changed params, in a copy of a finished run.

The claims are about students, so every variant reuses the run's cached teacher, pairs and annealed
student (docs/methods.md §4–§5) and re-runs only the student stages:
- `term_off`: `distill@fgd` with `distill.guidance_weight = 0` (pair term only, same init), every run;
- `msd_k5`: five MSD students (`msd.students = [0..4]`) and their router, first run only;
- `tsm_on` / `tsm_off`: two half-size MSD students (about half the single student's parameters, random
  init) with `msd.tsm_steps` TSM steps first, and without TSM but given as many extra objective steps
  (TSM steps are the cheaper ones, so the baseline gets at least equal compute), first run only.
Each variant's model is scored with the `eval` stage's own reference and noise (`eval_inputs`), so its
FD is comparable with the run's leaderboard rows. MLflow is off in the copies: they are throw-away.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.context import env

COPIED = ("params.yaml", "dvc.yaml", "pipeline", "stages", "data", "models", "metrics")  # never scratch/: no resume
LINKED = ("pairs",)  # large and read-only for student stages


@dataclass
class Variant:
    name: str
    edits: dict[str, Any]  # dotted params key -> value
    model: str  # the model it produces, scored at one step
    first_run_only: bool
    commands: list[list[str]] = field(default_factory=list)


def students_commands(students: list[int]) -> list[list[str]]:
    return [["stages", "msd", str(k)] for k in students] + [["stages", "router"]]


def half_width(net: dict[str, Any], shape: tuple[int, ...], classes: int) -> int | None:
    """The `width` whose net has the parameter count closest to half of `net`'s (mlp / resmlp only)."""
    from pipeline.config import NetSpec
    from pipeline.nets import build_net, count_params

    if net["kind"] not in ("mlp", "resmlp"):
        return None

    def size(width: int) -> int:
        return count_params(build_net(NetSpec(**{**net, "width": width}), shape, classes))

    target = size(net["width"]) / 2
    return min(range(8, net["width"] + 1), key=lambda w: abs(size(w) - target))


def variants(params: dict[str, Any], shape: tuple[int, ...], classes: int) -> list[Variant]:
    msd = params["msd"]
    out = [Variant("term_off", {"distill.guidance_weight": 0.0}, "distill@fgd", False, [["stages", "distill", "fgd"]])]
    if classes >= 5:
        five = [0, 1, 2, 3, 4]
        out.append(Variant("msd_k5", {"msd.students": five}, "msd@ensemble", True, students_commands(five)))
    width = half_width(params["anneal"]["net"], shape, classes)
    if width is not None:
        half, tsm = {**params["anneal"]["net"], "width": width}, max(1, msd["steps"] * 2 // 5)
        commands = students_commands(msd["students"])
        out += [
            Variant("tsm_on", {"msd.net": half, "msd.tsm_steps": tsm}, "msd@ensemble", True, commands),
            Variant("tsm_off", {"msd.net": half, "msd.tsm_steps": 0, "msd.steps": msd["steps"] + tsm},
                    "msd@ensemble", True, commands),
        ]  # fmt: skip
    return out


def edited(params: dict[str, Any], edits: dict[str, Any]) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(params))
    for dotted, value in edits.items():
        *path, last = dotted.split(".")
        section = out
        for key in path:
            section = section[key]
        section[last] = value
    return out


def prepare(run: Path, copy: Path, variant: Variant) -> None:
    """A copy of the run with the variant's params; the models the variant rebuilds are removed first."""
    copy.mkdir(parents=True)
    for name in COPIED:
        if (run / name).is_dir():
            shutil.copytree(run / name, copy / name)
        elif (run / name).exists():
            shutil.copy2(run / name, copy / name)
    for name in LINKED:
        (copy / name).symlink_to((run / name).resolve())
    params = yaml.safe_load((run / "params.yaml").read_text())
    (copy / "params.yaml").write_text(yaml.safe_dump(edited(params, variant.edits), sort_keys=False))
    for rebuilt in {variant.model, *(["msd"] if variant.model == "msd@ensemble" else [])}:
        shutil.rmtree(copy / "models" / rebuilt, ignore_errors=True)


def train(copy: Path, variant: Variant, threads: int) -> float:
    """Run the variant's stages in order in its copy; wall seconds. A failure raises with the stage's output."""
    start = time.perf_counter()
    extra = {"SLIMSTEP_THREADS": str(threads), "SLIMSTEP_TRACKING": "off"}
    for command in variant.commands:
        out = subprocess.run([sys.executable, "-m", *command], cwd=copy, env=env(extra), capture_output=True,
                             text=True)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{variant.name}: {' '.join(command)} failed ({out.returncode}):\n{out.stderr[-1500:]}")
    return time.perf_counter() - start


def score(run: Path, models: list[Path]) -> list[float]:
    """One-step FD of each model, on the run's eval reference and noise (the leaderboard's protocol)."""
    from pipeline.config import load_params
    from pipeline.data import load_split
    from pipeline.evaluation import eval_inputs, evaluate_sampler
    from pipeline.modelio import load_model

    p = load_params(run / "params.yaml").eval
    ref, noise = eval_inputs(load_split(run / "data"), load_model(run / "models" / "featurizer").net,
                             p.n_samples, p.seeds)  # fmt: skip
    return [evaluate_sampler(load_model(m).net, "onestep", ref, noise, p.batch_size, p.knn_k, 8)["fd"] for m in models]


def run_ablations(runs: list[Path], workdir: Path, workers: int = 2) -> dict[Path, dict[str, dict[str, float]]]:
    """{run: {variant: {"fd": ..., "train_s": ...}}} for every variant that applies to that run.

    Variants run `workers` at a time, one torch thread each, longest first."""
    from pipeline.data import load_split

    jobs: list[tuple[Path, Variant, Path]] = []
    for i, run in enumerate(runs):
        params = yaml.safe_load((run / "params.yaml").read_text())
        train_split = load_split(run / "data").train
        for variant in variants(params, train_split.shape, train_split.num_classes):
            if i == 0 or not variant.first_run_only:
                copy = workdir / f"ablation-{i}-{variant.name}"
                prepare(run, copy, variant)
                jobs.append((run, variant, copy))
    jobs.sort(key=lambda job: -len(job[1].commands))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        walls = list(pool.map(lambda job: train(job[2], job[1], threads=1), jobs))
    results: dict[Path, dict[str, dict[str, float]]] = {}
    for run in runs:
        done = [(job, wall) for job, wall in zip(jobs, walls, strict=True) if job[0] == run]
        fds = score(run, [copy / "models" / variant.model for (_, variant, copy), _ in done])
        results[run] = {variant.name: {"fd": fd, "train_s": round(wall, 1)}
                        for ((_, variant, _), wall), fd in zip(done, fds, strict=True)}  # fmt: skip
    return results
