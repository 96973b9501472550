"""Benchmark `deploy`: the one-step student on CPU through PyTorch eager, torch.compile, onnxruntime and
onnxruntime with dynamic int8 quantisation; samples/s and latency at batch 1, 16 and 256, all four backends
interleaved per repetition, ratios to eager; and the FD each exported form costs (eval's protocol).

The model: `--repo`'s distill@fgd (a finished run), else the smoke chain's, plus, without `--repo`, an
untrained net of the digits profile's student size (speed does not depend on the weights; its FD means nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import Report, interleave, median, paired_ratio
from benchmarks.context import Context

BATCHES = (1, 16, 256)
BACKENDS = ("eager", "torch.compile", "onnxruntime", "onnxruntime int8")
STAGE = "distill@fgd"


def _digits_sized_student(workdir: Path) -> Path:
    """An untrained student of the digits profile's size, saved as a model folder."""
    from pipeline.config import Params
    from pipeline.modelio import save_model
    from pipeline.nets import build_net

    spec = Params().anneal.net  # the schema defaults are the digits profile
    torch.manual_seed(0)
    folder = workdir / "digits-size-student"
    meta = {"stage": STAGE, "kind": "onestep", "net": spec.model_dump(), "data_shape": [1, 8, 8], "num_classes": 10}
    save_model(folder, build_net(spec, (1, 8, 8), 10), meta)
    return folder


def backends(folder: Path, workdir: Path, threads: int) -> tuple[dict[str, Callable[..., Any]], dict[str, Any]]:
    """Backend name -> fn(noise numpy, label numpy) -> numpy samples; and the export facts."""
    from pipeline.export import OneStepGraph, OnnxSampler, export_model, quantize_int8
    from pipeline.modelio import load_model

    graph = OneStepGraph(load_model(folder).net).eval()
    compiled = torch.compile(graph, dynamic=False)
    fp32 = workdir / f"{folder.name}.onnx"
    info = export_model(folder, "onnx", fp32)
    int8 = quantize_int8(fp32, workdir / f"{folder.name}.int8.onnx")
    sessions = {"onnxruntime": OnnxSampler(fp32, threads), "onnxruntime int8": OnnxSampler(int8, threads)}

    def torch_fn(module: nn.Module) -> Callable[..., Any]:
        def run(noise: np.ndarray, label: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(noise), torch.from_numpy(label)).numpy()

        return run

    fns = {"eager": torch_fn(graph), "torch.compile": torch_fn(compiled), **sessions}
    facts = {"onnx_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size, "exporter": info["exporter"]}
    return fns, facts


def speed(fns: dict[str, Callable[..., Any]], ctx: Context, model: str) -> list[dict[str, Any]]:
    rows = []
    for batch in BATCHES:
        rng = np.random.default_rng(ctx.seed)
        noise = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
        label = (np.arange(batch) % 10).astype(np.int64)
        calls = {name: partial(fn, noise, label) for name, fn in fns.items()}
        times = interleave(calls, repeats=ctx.repeats(5, 11), warmup=2, min_block_s=0.05)
        for name in fns:
            rows.append({"model": model, "batch": batch, "backend": name, "latency_ms": 1e3 * median(times[name]),
                         "samples_per_s": batch / median(times[name]),
                         "speed_vs_eager": paired_ratio(times["eager"], times[name])})  # fmt: skip
    return rows


def quality(fns: dict[str, Callable[..., Any]], run: Path) -> list[dict[str, Any]]:
    """FD of each backend's samples on the eval stage's noise, labels, featurizer and reference."""
    from pipeline.config import load_params
    from pipeline.data import load_split
    from pipeline.evaluation import eval_inputs, sample_quality
    from pipeline.modelio import load_model

    p = load_params(run / "params.yaml").eval
    featurizer = load_model(run / "models" / "featurizer").net
    ref, noise = eval_inputs(load_split(run / "data"), featurizer, p.n_samples, p.seeds)
    labels = ref.labels.numpy()
    made = {name: [torch.from_numpy(fns[name](z.numpy(), labels)) for z in noise]
            for name in ("eager", "onnxruntime", "onnxruntime int8")}  # fmt: skip
    rows = []
    for name, samples in made.items():
        scores = sample_quality(samples, ref, p.knn_k)
        diff = max(float((a - b).abs().max()) for a, b in zip(samples, made["eager"], strict=True))
        rows.append({"backend": name, "fd": scores["fd"], "fd_std": scores["fd_std"],
                     "class_acc": scores["class_acc"], "max_abs_diff_vs_eager": diff})  # fmt: skip
    for row in rows:
        row["fd_cost_vs_eager"] = row["fd"] - rows[0]["fd"]
    return rows


def run(ctx: Context) -> Report:
    report = Report()
    source = ctx.repo if ctx.repo is not None else ctx.smoke_run
    trained = source / "models" / STAGE
    models = {f"{STAGE} ({'--repo' if ctx.repo else 'smoke chain'})": trained}
    if ctx.repo is None:
        models[f"{STAGE} digits-size, untrained"] = _digits_sized_student(ctx.workdir)
        report.notes.append(
            "no --repo: the trained model is the smoke chain's (a tiny student, FDs of the smoke scale); the "
            "digits-size untrained net shows the speeds at the default profile's student size"
        )
    rows, facts, quality_rows = [], {}, []
    for label, folder in models.items():
        fns, facts[label] = backends(folder, ctx.workdir, ctx.threads)
        rows += speed(fns, ctx, label)
        if folder == trained:
            quality_rows = quality(fns, source)
    report.tables["one-step sampling by backend (same-run ratios to eager)"] = rows
    report.tables[f"FD by backend ({next(iter(models))}, eval protocol)"] = quality_rows
    report.figures["exports"] = facts
    report.settings.update({"batches": list(BATCHES), "backends": list(BACKENDS), "repeats": ctx.repeats(5, 11),
                            "onnxruntime_threads": ctx.threads, "torch_threads": torch.get_num_threads()})  # fmt: skip
    for row in rows:
        if row["backend"] != "eager":
            report.summary[f"{row['model']}: {row['backend']} ÷ eager samples/s, batch {row['batch']}"] = row[
                "speed_vs_eager"
            ]
    int8 = next(r for r in quality_rows if r["backend"] == "onnxruntime int8")
    report.summary["FD cost of int8 (int8 FD - eager FD)"] = int8["fd_cost_vs_eager"]
    report.notes.append(
        "every backend runs the same graph: noise + (1 - eps) v(noise, eps, label), clamped to [-1, 1]; int8 is "
        "onnxruntime.quantization.quantize_dynamic (weights int8) after rewriting Gemm as MatMul"
    )
    return report
