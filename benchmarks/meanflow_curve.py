"""MeanFlow's FD against training step, in one finished run (benchmarks/results/dmd2_meanflow.md).

The `meanflow` stage's own recipe (its params, the student's net, seed and data), optionally with another
learning rate, trained in chunks of `every` steps: `pipeline.training.train` resumes bit-identically from its
checkpoint, so the last chunk's model is the stage's model (same threads). After each chunk the EMA is scored
at one step on the `eval` stage's reference and noise. One JSON row per chunk, rewritten after each (a stopped
curve keeps its points); `--plot` draws curves from such files.

    cd path/to/finished/run && SLIMSTEP_THREADS=1 python /path/to/slimstep/benchmarks/meanflow_curve.py out.json
    ... meanflow_curve.py low-lr.json --lr 6e-4        # another learning rate than meanflow.lr
    python benchmarks/meanflow_curve.py --plot curve.png out.json low-lr.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def curve(out: Path, every: int, lr: float | None) -> list[dict[str, Any]]:
    import torch

    from pipeline.config import load_params
    from pipeline.data import load_split
    from pipeline.evaluation import eval_inputs, evaluate_sampler
    from pipeline.modelio import load_model, save_model
    from pipeline.runtime import configure_threads
    from pipeline.training import train
    from stages.meanflow import recipe

    configure_threads()  # SLIMSTEP_THREADS, as a stage: same threads, same weights
    params = load_params(Path("params.yaml"))
    if lr is not None:
        params = params.model_copy(update={"meanflow": params.meanflow.model_copy(update={"lr": lr})})
    a, e = params.anneal, params.eval
    split = load_split(Path("data"))
    ref, noise = eval_inputs(split, load_model(Path("models/featurizer")).net, e.n_samples, e.seeds)
    data = split.train
    settings, net, loss, batches = recipe(params, data, torch.device("cpu"))
    work = out.with_suffix(".work")
    work.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    for stop in range(every, settings.steps + 1, every):
        started = time.perf_counter()
        result = train(net, loss, batches, settings, checkpoint=work / "checkpoint.pt", desc="meanflow",
                       progress=False, stop_after=stop)  # fmt: skip
        save_model(work / "model", result.ema, {"stage": "meanflow", "kind": "meanflow", "net": a.net.model_dump(),
                   "data_shape": list(data.shape), "num_classes": data.num_classes, "steps": stop})  # fmt: skip
        scores = evaluate_sampler(load_model(work / "model").net, "onestep", ref, noise, e.batch_size, e.knn_k, 8)
        recent, wall = result.losses[-100:], round(time.perf_counter() - started, 1)
        rows.append({"step": stop, "lr": settings.lr, "fd": scores["fd"], "fd_std": scores.get("fd_std"),
                     "precision": scores.get("precision"), "recall": scores.get("recall"),
                     "loss_last100": sum(recent) / len(recent), "chunk_s": wall})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps(rows, indent=1))
    return rows


def plot(curves: list[Path], path: Path) -> None:
    """FD (log scale) and recall against step, one line per curve file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (fd_ax, recall_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for file in curves:
        rows = json.loads(file.read_text())
        steps = [r["step"] for r in rows]
        label = f"{file.stem}, lr {rows[0]['lr']:g}"
        fd_ax.plot(steps, [r["fd"] for r in rows], marker="o", label=label)
        recall_ax.plot(steps, [r["recall"] for r in rows], marker="o", label=label)
    fd_ax.set_yscale("log")
    some = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "125" else "")  # 1, 2, 5 × 10^k: no crowding
    fd_ax.yaxis.set_major_formatter(some), fd_ax.yaxis.set_minor_formatter(some)
    fd_ax.set_ylabel("FD at one step (log scale; lower is better)")
    recall_ax.set_ylabel("recall (coverage of the data; higher is better)")
    for ax in (fd_ax, recall_ax):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("MeanFlow on digits: the EMA scored every 1000 steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.meanflow_curve", description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+", help="the curve's JSON (with --plot: the PNG, then curves)")
    parser.add_argument("--every", type=int, default=1000, help="steps per chunk (one point each)")
    parser.add_argument("--lr", type=float, help="another learning rate than meanflow.lr")
    parser.add_argument("--plot", action="store_true", help="draw the curve files instead of training")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.files[1:], args.files[0])
    else:
        curve(args.files[0], args.every, args.lr)


if __name__ == "__main__":
    main()
