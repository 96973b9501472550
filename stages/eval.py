"""Stage `eval`: every model × sampler on the same noise → leaderboard, DVC metrics and plots, sample grids.

With `eval.fid` set, every row also gets FID/KID in the user's Inception features (pipeline/fid.py) and the
protocol is written to reports/metrics.json (`fid_protocol`) and MLflow. The Inception file is a params value;
under inputs/ it is also a DVC dependency, elsewhere only its recorded sha256 tells two files apart.
"""

import json
from pathlib import Path

import pandas as pd
import torch

from pipeline.app.stage import stage
from pipeline.atomic import atomic_write_text
from pipeline.config import FidSection
from pipeline.data import Split, load_split
from pipeline.evaluation import (
    Reference,
    eval_inputs,
    evaluate_sampler,
    flow_straightness,
    generate,
    group_quality,
    real_floor,
)
from pipeline.fid import FidError, FidScorer, make_scorer
from pipeline.flow import parse_sampler, sample
from pipeline.grids import sample_grid
from pipeline.modelio import load_model, model_hash
from pipeline.nets import count_macs, count_params
from pipeline.plots import Panel, quality_vs_nfe, side_by_side

REPORTS, MODELS = Path("reports"), Path("models")
COLUMNS = ["model", "sampler", "nfe", "params", "macs_per_sample", "fd", "fd_std", "fd_heldout", "fd_heldout_std",
           "precision", "recall", "class_acc", "memorisation", "out_of_range", "straightness", "samples_per_s",
           "latency_ms", "params_ratio", "speedup", "equal_quality_sampler", "speedup_equal_quality"]  # fmt: skip


METRIC_KEYS = ("fd", "fd_std", "fd_heldout", "nfe", "params", "straightness", "speedup", "speedup_equal_quality")
FID_KEYS = ("fid", "kid")


def fid_scorer(settings: FidSection | None, split: Split) -> FidScorer | None:
    """The scorer `eval.fid` asks for (None when off); bad settings stop the stage with one line."""
    if settings is None:
        return None
    try:
        return make_scorer(settings.inception, settings.reference, settings.n_samples, torch.from_numpy(split.train.x))
    except FidError as exc:
        raise SystemExit(f"error: {exc}") from None


def relative_to_teacher(board: pd.DataFrame) -> pd.DataFrame:
    """Size and speed against the teacher at its pair/default sampler (the first dopri5 row, else the last row)."""
    teacher = board[board["model"] == "teacher"]
    if teacher.empty:
        return board
    dopri = teacher[teacher["sampler"].str.startswith("dopri5")]
    reference = (dopri if not dopri.empty else teacher).iloc[-1]
    board["params_ratio"] = board["params"] / reference["params"]
    board["speedup"] = board["samples_per_s"] / reference["samples_per_s"]
    return equal_quality(board, teacher)


def equal_quality(board: pd.DataFrame, teacher: pd.DataFrame) -> pd.DataFrame:
    """Each one-step row against the fastest teacher sampler (measured samples/s) whose FD is at most its own.

    `equal_quality_sampler` names that sampler, or says why there is none (then the speed-up is NaN): the
    figure a user deciding between the student and a cheap teacher solver needs, beside the dopri5 ratio.
    """
    board["equal_quality_sampler"] = ""
    board["speedup_equal_quality"] = float("nan")
    for i, row in board[board["sampler"] == "onestep"].iterrows():
        rivals = teacher[teacher["fd"] <= row["fd"]]
        if rivals.empty:
            reason = f"none: no teacher sampler reaches fd {row['fd']:.4g} (best {teacher['fd'].min():.4g})"
            board.at[i, "equal_quality_sampler"] = reason
            continue
        rival = rivals.loc[rivals["samples_per_s"].idxmax()]
        board.at[i, "equal_quality_sampler"] = rival["sampler"]
        board.at[i, "speedup_equal_quality"] = row["samples_per_s"] / rival["samples_per_s"]
    return board


def write_msd_groups(ref: Reference, noise: list[torch.Tensor], device: torch.device) -> None:
    """MSD ensemble vs the single same-size student (distill@fgd), class group by class group."""
    router = load_model(MODELS / "msd@ensemble", device)
    groups = router.meta["groups"]
    rows = [{"model": model.name, **row} for model in (router, load_model(MODELS / "distill@fgd", device))
            for row in group_quality(model.net, ref, noise, groups)]  # fmt: skip
    atomic_write_text(REPORTS / "msd_groups.csv", pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))


def write_stepper_transfer(ref: Reference, noise: list[torch.Tensor], device: torch.device) -> None:
    """The teacher-trained RL policy, unchanged, on the annealed student's flow vs fixed solvers (never fed back)."""
    from pipeline.stepsize import ReferenceCache, StepPolicy, pareto_table

    student, policy = load_model(MODELS / "anneal@slimflow", device).net, StepPolicy.load(MODELS / "stepper")
    z, label = noise[0][:256].to(device), ref.labels[:256].to(device)
    x_ref = ReferenceCache(student, tol=policy.config.ref_tol)(z, label)
    table = pareto_table(student, z, label, x_ref, policy.config.warp, policy)
    atomic_write_text(REPORTS / "stepper_transfer.csv", table.to_csv(index=False, float_format="%.6g"))


def side_panel(
    net: torch.nn.Module, name: str, grid_sampler: str, grid: torch.Tensor, rows: list[dict], noise: torch.Tensor,
    labels: torch.Tensor, device: torch.device,
) -> Panel:  # fmt: skip
    """The model's panel in the side-by-side image: a sampler the leaderboard measured, so its FD is in the title.

    The grid's own sampler when it was evaluated, else the model's best-FD evaluated sampler (sampled anew)."""
    measured = {r["sampler"]: r["fd"] for r in rows if r["model"] == name}
    if parse_sampler(grid_sampler).name in measured or not measured:
        return Panel(name, grid_sampler, measured.get(parse_sampler(grid_sampler).name, float("nan")), grid)
    best = min(measured, key=measured.get)
    x = sample(net, noise.to(device), labels.to(device), best).x.cpu()
    return Panel(name, best, measured[best], x)


def model_dirs() -> list[Path]:
    """Every generative model on disk, the teacher first."""
    dirs = [d for d in sorted(MODELS.iterdir()) if (d / "meta.json").exists() and d.name != "featurizer"]
    return sorted(dirs, key=lambda d: d.name != "teacher")


def main() -> None:
    with stage("eval", ["eval"]) as s:
        p, split = s.params.eval, load_split(Path("data"))
        shape, classes, conditional = split.train.shape, split.train.num_classes, split.train.conditional
        s.tracker.set_tags({"slimstep.featurizer": model_hash(MODELS / "featurizer")})  # compare ranks like with like
        featurizer = load_model(MODELS / "featurizer", s.device).net
        ref, noise = eval_inputs(split, featurizer, p.n_samples, p.seeds)
        fid = fid_scorer(p.fid, split)
        fid_labels = ref.train_labels[torch.arange(p.fid.n_samples) % len(ref.train_labels)] if fid else None
        rows = [{"model": "real", "params": 0, "macs_per_sample": 0, **real_floor(ref, p.knn_k),
                 **(fid.score(ref.test_x) if fid else {})}]  # fmt: skip
        grid_rows = classes if conditional else 8  # unconditional: 8 x grid_per_class images in a square mosaic
        grid_labels = torch.arange(classes).repeat_interleave(p.grid_per_class) if conditional else \
            torch.zeros(grid_rows * p.grid_per_class, dtype=torch.long)
        grid_noise = torch.randn((len(grid_labels), *shape), generator=torch.Generator().manual_seed(0))
        (REPORTS / "grids").mkdir(parents=True, exist_ok=True)
        panels = []
        for directory in model_dirs():
            model = load_model(directory, s.device)
            net, meta = model.net, model.meta
            onestep = meta["kind"] != "flow"
            samplers = (
                ["onestep"]
                if onestep
                else (p.teacher_samplers if meta["stage"] == "teacher" else p.flow_samplers)
            )
            macs = count_macs(net, shape, classes)
            s_value = float("nan") if onestep else flow_straightness(net, ref, noise)
            for sampler in samplers:
                row = evaluate_sampler(net, sampler, ref, noise, p.batch_size, p.knn_k, p.timing_batch)
                if fid:
                    row.update(fid.score(generate(net, sampler, shape, fid_labels, p.batch_size)))
                rows.append({"model": meta["stage"], "params": count_params(net), "straightness": s_value,
                             **row, "macs_per_sample": macs * row["nfe"]})  # fmt: skip
                print(f"{meta['stage']:>16} {row['sampler']:>14}  nfe {row['nfe']:6.1f}  fd {row['fd']:.3f}")
            grid_sampler = "onestep" if onestep else meta.get("default_sampler", "dopri5-1e-05")
            grid = sample(net, grid_noise.to(s.device), grid_labels.to(s.device), grid_sampler).x.cpu()
            grid_path = REPORTS / "grids" / f"{meta['stage'].replace('@', '-')}.png"
            sample_grid(grid, grid_labels, classes, grid_path, f"{meta['stage']} ({grid_sampler})", conditional,
                        split.train.class_names)  # fmt: skip
            s.tracker.log_artifact(grid_path, "grids")
            panels.append(side_panel(net, meta["stage"], grid_sampler, grid, rows, grid_noise, grid_labels, s.device))
        side_by_side(panels, grid_labels, classes, REPORTS / "grids" / "all_models.png", conditional=conditional,
                     class_names=split.train.class_names)
        s.tracker.log_artifact(REPORTS / "grids" / "all_models.png", "grids")

        write_msd_groups(ref, noise, s.device)
        write_stepper_transfer(ref, noise, s.device)
        columns = [*COLUMNS[:6], *(FID_KEYS if fid else ()), *COLUMNS[6:]]
        board = relative_to_teacher(pd.DataFrame(rows)).reindex(columns=columns)
        atomic_write_text(REPORTS / "leaderboard.csv", board.to_csv(index=False, float_format="%.6g"))
        board[["model", "sampler", "nfe", "fd", "fd_std"]].to_csv(REPORTS / "quality_nfe.csv", index=False)
        quality_vs_nfe(board, REPORTS / "quality_nfe.png", floor=rows[0]["fd"])
        keys = (*METRIC_KEYS, *(FID_KEYS if fid else ()))
        metrics = {f"{r['model']}/{r['sampler']}": {k: None if pd.isna(r[k]) else r[k] for k in keys}
                   for r in board.to_dict("records")}  # fmt: skip
        if fid:
            s.tracker.log_params({f"fid.{k}": v for k, v in fid.protocol.items()})
            s.tracker.log_metrics({f"{k}/fid": v["fid"] for k, v in metrics.items() if v["fid"] is not None})
        atomic_write_text(REPORTS / "metrics.json", json.dumps({**metrics, **({"fid_protocol": fid.protocol}
                                                                              if fid else {})}, indent=2))  # fmt: skip
        s.tracker.log_artifact(REPORTS / "leaderboard.csv")
        s.tracker.log_artifact(REPORTS / "quality_nfe.png")
        s.tracker.log_metrics({f"{k}/fd": v["fd"] for k, v in metrics.items()})
