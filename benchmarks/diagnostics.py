"""Why Flow-Guided Distillation wins or loses on a run: three diagnostics (docs/methods.md §4).

1. FD of the 2-step targets x_2step(z) themselves, on the `eval` stage's noise: the guidance term pulls the
   one-step student towards them, so if they are worse than the naive student the term can only pull down.
   Measured with the student at the start of distillation (the annealed raw weights) and at its end.
2. For the stored pairs' noise z: ||x_2step(z) - T(z)||^2 against ||G(z) - T(z)||^2 (T: the stored teacher
   sample, G: a one-step student): whether the two loss terms aim at the same map.
3. The pair-overfitting gap: each student's pair loss on pairs it trained on vs on fresh teacher pairs
   (new per-sample seeds, the train set's solver): whether there is anything for fresh noise to regularise.

Squared distances are per-dimension means, the pair term's own L2 (`l2_distance`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import Report
from benchmarks.context import Context

STUDENTS = ("distill@fgd", "distill@naive-paper", "distill@naive")
DIAGNOSTIC_SEED = 0  # the s ~ U(s_min, s_max) draws of x_2step


def _batched(fn: Any, *tensors: Tensor, batch: int = 1000) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(*chunks) for chunks in zip(*(t.split(batch) for t in tensors), strict=True)])


def _sq(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).flatten(1).mean(1).mean())


def stored_pairs(root: Path, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first n stored (z, x, label) of a pair store, in shard order (pairs every student trained on)."""
    from pipeline.pairs import load_metadata

    zs, xs, ys, have = [], [], [], 0
    for entry in load_metadata(root)["shards"]:
        shard = torch.load(root / entry["file"], weights_only=True)
        zs.append(shard["z"]), xs.append(shard["x"].float()), ys.append(shard["label"])
        have += len(shard["z"])
        if have >= n:
            break
    return torch.cat(zs)[:n], torch.cat(xs)[:n], torch.cat(ys)[:n]


def fresh_pairs(run: Path, params: Any, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """n new teacher pairs: the train set's seed formula at indices after the store's, solved like the store."""
    from pipeline.flow import sample
    from pipeline.modelio import load_model
    from pipeline.pairs import load_metadata, pair_noise

    p, pair_set = params.pairs, params.pairs.sets[params.pairs.train_set]
    meta = load_metadata(run / "pairs" / p.train_set)
    z, label = pair_noise(p.seed, range(meta["n_pairs"], meta["n_pairs"] + n), meta["data_shape"], meta["labels"])
    teacher = load_model(run / pair_set.flow).net
    if pair_set.solver == "rl":
        from stages.pairs import rl_solver

        solve = rl_solver(str(run / pair_set.policy))
    else:
        solve = lambda v, z_, y_: sample(v, z_, y_, pair_set.solver)  # noqa: E731
    x = _batched(lambda z_, y_: solve(teacher, z_, y_).x, z, label, batch=p.solve_batch)
    return z, x, label


def two_step_targets(student: nn.Module, guide_loss: Any, z: Tensor, label: Tensor) -> Tensor:
    """x_2step(z) (N,*shape) exactly as the guidance term builds it, from `student`'s velocity at (z, eps)."""
    from pipeline.flow import EPS

    torch.manual_seed(DIAGNOSTIC_SEED)

    def target(z_: Tensor, y_: Tensor) -> Tensor:
        return guide_loss.target(student(z_, torch.full((len(z_),), EPS), y_), z_, y_)

    return _batched(target, z, label)


def diagnose(run: Path, n_pairs: int = 5000) -> dict[str, Any]:
    """The three diagnostics of one finished run (CPU); students the run lacks (and, without distill@fgd, the
    targets at distillation's end) are left out."""
    from pipeline.config import load_params
    from pipeline.data import load_split
    from pipeline.evaluation import eval_inputs, sample_quality
    from pipeline.flow import one_step
    from pipeline.modelio import RAW_WEIGHTS as RAW
    from pipeline.modelio import load_model
    from pipeline.nets import build_net
    from pipeline.slimflow import FlowGuidedDistillationLoss

    params = load_params(run / "params.yaml")
    d, e = params.distill, params.eval
    annealed = load_model(run / "models" / "anneal@slimflow")
    guide = annealed.net if d.guide == "anneal" else load_model(run / "models" / "teacher").net
    loss = FlowGuidedDistillationLoss(guide, range(annealed.meta["num_classes"]), d.s_min, d.s_max, "l2", 1.0,
                                      d.guide_steps)  # fmt: skip
    init = build_net(params.anneal.net, tuple(annealed.meta["data_shape"]), annealed.meta["num_classes"])
    init.load_state_dict(torch.load(run / "models" / "anneal@slimflow" / RAW, map_location="cpu", weights_only=True))
    students = {name: load_model(run / "models" / name).net for name in STUDENTS if (run / "models" / name).exists()}
    x2_sources = {"x_2step at distillation start": init.eval()}
    if "distill@fgd" in students:
        x2_sources["x_2step at distillation end"] = students["distill@fgd"]

    ref, noise = eval_inputs(load_split(run / "data"), load_model(run / "models" / "featurizer").net, e.n_samples,
                             e.seeds)  # fmt: skip
    labels = ref.labels

    def fd(make: Any) -> float:
        return sample_quality([make(z) for z in noise], ref, e.knn_k)["fd"]

    target_fd = {name: fd(lambda z, s=src: two_step_targets(s, loss, z, labels)) for name, src in x2_sources.items()}
    target_fd.update({f"{name} one step": fd(lambda z, g=g: _batched(lambda z_, y_: one_step(g, z_, y_), z, labels))
                      for name, g in students.items()})  # fmt: skip

    z, x, label = stored_pairs(run / "pairs" / params.pairs.train_set, n_pairs)
    aims = {f"‖{name} - T‖²": _sq(two_step_targets(src, loss, z, label), x) for name, src in x2_sources.items()}
    outputs = {name: _batched(lambda z_, y_, g=g: one_step(g, z_, y_), z, label) for name, g in students.items()}
    aims.update({f"‖G {name} - T‖²": _sq(out, x) for name, out in outputs.items()})
    if "distill@fgd" in students:
        aims["‖x_2step at distillation end - G distill@fgd‖²"] = _sq(
            two_step_targets(students["distill@fgd"], loss, z, label), outputs["distill@fgd"]
        )

    fz, fx, flabel = fresh_pairs(run, params, n_pairs)
    gap = {}
    for name, g in students.items():
        seen, fresh = _sq(outputs[name], x), _sq(_batched(lambda z_, y_, g=g: one_step(g, z_, y_), fz, flabel), fx)
        gap[name] = {"train_pairs": seen, "fresh_pairs": fresh, "gap": fresh - seen, "ratio": fresh / seen}
    return {"target_fd": target_fd, "aims": aims, "overfit": gap, "n_pairs": n_pairs}


def add_diagnostics(report: Report, paths: list[Path]) -> None:
    """The three diagnostics per run, as tables with a mean ± std row over runs."""
    from benchmarks.quality import mean_std, pm  # the claims table's own formatting

    found = {str(p): diagnose(p) for p in paths if (p / "models" / "anneal@slimflow").exists()}
    if not found:
        return
    report.figures["diagnostics"] = found

    def rows(key: str) -> list[dict[str, Any]]:
        names = list(dict.fromkeys(n for result in found.values() for n in result[key]))
        per_run = [{"run": run, **{n: result[key].get(n) for n in names}} for run, result in found.items()]
        if len(per_run) > 1:
            per_run.append({"run": "mean ± std", **{
                n: pm(*mean_std([r[n] for r in per_run if r[n] is not None])) for n in names}})  # fmt: skip
        return per_run

    report.tables["diagnostic 1: FD of the 2-step targets x_2step(z) vs the one-step students (eval noise)"] = rows(
        "target_fd"
    )
    report.tables["diagnostic 2: squared distance to the teacher T(z) on the stored pairs' noise"] = rows("aims")
    gaps = [{"run": run, "student": name, **values} for run, result in found.items()
            for name, values in result["overfit"].items()]  # fmt: skip
    report.tables["diagnostic 3: pair loss on training pairs vs fresh teacher pairs"] = gaps


def run(ctx: Context) -> Report:
    """`--only diagnostics`: the three diagnostics alone, for the runs given (the quality benchmark adds them too)."""
    report = Report()
    paths = ctx.runs or [ctx.smoke_run]
    if not ctx.runs:
        report.notes.append("no --runs: ONE smoke-profile run (tiny nets); its numbers say nothing about digits")
    add_diagnostics(report, paths)
    report.settings["runs"] = [str(p) for p in paths]
    return report
