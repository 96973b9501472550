"""Exported one-step samplers: a self-contained graph noise, label -> sample for CPUs without slimstep.

Every format wraps the model folder's velocity net v(x, t, label) in `OneStepGraph`, the one-step map of
docs/methods.md §4 with the clamp inside the graph:

    inputs   noise  float32 (N, *data_shape), standard normal; label  int64 (N,), 0 <= label < num_classes
    output   sample float32 (N, *data_shape) = clamp(noise + (1 - eps) v(noise, eps, label), -1, 1)

N is dynamic. Any nn.Module with forward(x, t, label) exports (the nets of pipeline/nets, diffusers-backed
nets, the MSD router). The MSD router exports as one graph: every student runs on the samples it owns
(gathered by label, scattered back), so the routing table lives inside the file.

Formats: `onnx` (torch.onnx, TorchScript-based exporter; the dynamo exporter is the fallback), `torchscript`
(torch.jit.trace of the same graph), `safetensors` (the velocity net's weights only: rebuild the net from
the meta's `net` spec). Beside each file, `<name>.meta.json` says shapes, classes, value range, the model's
hash (pipeline/modelio.model_hash) and its FD from the leaderboard when one exists.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.flow import EPS, one_step
from pipeline.modelio import load_model, model_hash

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
VALUE_RANGE = (-1.0, 1.0)
INPUTS, OUTPUT = ("noise", "label"), "sample"
OPSET = 18
# Largest |ONNX - eager| on the same inputs the parity tests accept: fp32 rounding of a few dozen layers.
PARITY_ATOL = 1e-4


class RoutedVelocity(nn.Module):
    """The MSD router's velocity without data-dependent branches: each student runs on the (possibly empty)
    set of samples whose class it owns, and the results are scattered back into input order."""

    def __init__(self, router: Any) -> None:
        super().__init__()
        self.students = router.students
        self.register_buffer("owner", router.owner.clone())

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        owner = self.owner[label]
        v = torch.zeros_like(x)
        for k, student in enumerate(self.students):
            idx = torch.nonzero(owner == k).flatten()
            v = v.index_copy(0, idx, student(x[idx], t[idx], label[idx]))
        return v


class OneStepGraph(nn.Module):
    """noise (N, *shape), label (N,) -> one-step sample clamped to [-1, 1]: what every export contains."""

    def __init__(self, velocity: nn.Module, eps: float = EPS) -> None:
        super().__init__()
        from pipeline.msd.router import Router

        self.velocity = RoutedVelocity(velocity) if isinstance(velocity, Router) else velocity
        self.eps = eps

    def forward(self, noise: Tensor, label: Tensor) -> Tensor:
        return one_step(self.velocity, noise, label, self.eps).clamp(*VALUE_RANGE)


def meta_path(out: Path) -> Path:
    """`fgd.onnx` -> `fgd.meta.json` (several exports can share a folder)."""
    return out.with_name(f"{out.stem}.meta.json")


def leaderboard_fd(leaderboard: Path | None, stage: str) -> float:
    """The stage's one-step FD in a leaderboard CSV, NaN when there is none."""
    if leaderboard is None or not Path(leaderboard).exists():
        return math.nan
    import pandas as pd

    board = pd.read_csv(leaderboard)
    row = board[(board["model"] == stage) & (board["sampler"] == "onestep")]
    return float(row["fd"].iloc[0]) if not row.empty else math.nan


def _example_inputs(meta: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Two samples per class, so tracing sees every student of a router and a batch dimension that is not 1."""
    label = torch.arange(meta["num_classes"]).repeat(2)
    return torch.randn((len(label), *meta["data_shape"]), generator=torch.Generator().manual_seed(0)), label


def _onnx_bytes(graph: nn.Module, example: tuple[Tensor, Tensor]) -> tuple[bytes, str]:
    """The ONNX file's bytes and the exporter that made them (TorchScript-based first: seconds, not tens)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    graph, example, str(path), dynamo=False, opset_version=OPSET, input_names=list(INPUTS),
                    output_names=[OUTPUT], dynamic_axes={name: {0: "batch"} for name in (*INPUTS, OUTPUT)},
                )  # fmt: skip
            exporter = "torchscript"
        except Exception:  # noqa: BLE001 - nets the tracer cannot follow go through the dynamo exporter
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                graph, example, str(path), dynamo=True, input_names=list(INPUTS), output_names=[OUTPUT],
                dynamic_shapes={"noise": {0: batch}, "label": {0: batch}}, external_data=False,
            )  # fmt: skip
            exporter = "dynamo"
        return path.read_bytes(), exporter


def _torchscript_bytes(graph: nn.Module, example: tuple[Tensor, Tensor]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, example, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _safetensors_bytes(net: nn.Module) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()})


def export_net(net: nn.Module, meta: dict[str, Any], fmt: str, out: Path | str) -> dict[str, Any]:
    """Write any velocity net v(x, t, label) as a one-step sampler file; return what its meta.json says about it.

    `meta` needs data_shape and num_classes (a model folder's meta.json has them).
    """
    out = Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: allowed {', '.join(FORMATS)}")
    graph = OneStepGraph(net).eval()
    example = _example_inputs(meta)
    exporter = None
    with torch.no_grad():
        if fmt == "onnx":
            data, exporter = _onnx_bytes(graph, example)
        elif fmt == "torchscript":
            data = _torchscript_bytes(graph, example)
        else:
            data = _safetensors_bytes(net)
    atomic_write_bytes(out, data)
    shape = list(meta["data_shape"])
    return {
        "format": fmt, "exporter": exporter, "file": out.name, "data_shape": shape,
        "num_classes": meta["num_classes"], "value_range": list(VALUE_RANGE), "eps": EPS,
        "inputs": {"noise": {"dtype": "float32", "shape": ["N", *shape], "distribution": "N(0, 1)"},
                   "label": {"dtype": "int64", "shape": ["N"], "range": [0, meta["num_classes"] - 1]}},
        "output": {"sample": {"dtype": "float32", "shape": ["N", *shape], "range": list(VALUE_RANGE),
                              "clamped_in_graph": fmt != "safetensors"}},
        "torch": torch.__version__.split("+")[0], **({"opset": OPSET} if fmt == "onnx" else {}),
    }  # fmt: skip


ONE_STEP_KINDS = ("onestep", "router", "meanflow")  # a meanflow net called as v(x, t, label) is ū(x, t, 1)


def export_model(folder: Path | str, fmt: str, out: Path | str, leaderboard: Path | None = None) -> dict[str, Any]:
    """Export a one-step model folder (student, MSD router, MeanFlow) to `out`; write `<stem>.meta.json`; return it."""
    folder, out = Path(folder), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: allowed {', '.join(FORMATS)}")
    loaded = load_model(folder)
    meta = loaded.meta
    if meta["kind"] not in ONE_STEP_KINDS:
        raise ValueError(f"{folder}: a {meta['kind']!r} model is not a one-step generator; export needs one")
    fd = leaderboard_fd(leaderboard, meta["stage"])
    info = {
        **export_net(loaded.net, meta, fmt, out), "stage": meta["stage"], "kind": meta["kind"],
        "model_hash": model_hash(folder), "fd": None if math.isnan(fd) else fd, "net": meta.get("net"),
        "groups": meta.get("groups"),
    }  # fmt: skip
    atomic_write_text(meta_path(out), json.dumps(info, indent=2, sort_keys=True))
    return info


def cached_onnx(folder: Path | str, cache: Path, leaderboard: Path | None = None) -> Path:
    """The model's ONNX export in `cache`, keyed by its hash (a retrained model never reuses a stale file)."""
    folder = Path(folder)
    path = cache / f"{folder.name.replace('@', '-')}-{model_hash(folder)}.onnx"
    if not path.exists() or not meta_path(path).exists():
        export_model(folder, "onnx", path, leaderboard)
    return path


def gemm_as_matmul(model: Any) -> Any:
    """Rewrite Gemm(A, B, C) nodes (alpha = beta = 1, A not transposed, B a weight) as MatMul + Add.

    torch.onnx writes nn.Linear as Gemm, which onnxruntime's dynamic quantisation leaves in fp32; as MatMul
    it becomes an int8 MatMulInteger. The graph computes the same function.
    """
    import onnx
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        b = numpy_helper.to_array(weights[node.input[1]])
        name = f"{node.input[1]}_matmul"
        model.graph.initializer.append(numpy_helper.from_array(b.T.copy() if attrs.get("transB", 0) else b, name))
        product = f"{node.output[0]}_product" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{node.name}_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


def quantize_int8(onnx_file: Path | str, out: Path | str) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised per call) of an exported file."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "matmul.onnx"
        onnx.save(gemm_as_matmul(onnx.load(str(onnx_file))), str(plain))
        quantize_dynamic(plain, Path(tmp) / "int8.onnx", weight_type=QuantType.QInt8)
        atomic_write_bytes(out, (Path(tmp) / "int8.onnx").read_bytes())
    return Path(out)


class OnnxSampler:
    """An exported .onnx file run by onnxruntime: numpy noise, labels -> numpy samples in [-1, 1]."""

    def __init__(self, path: Path | str, threads: int = 0, model_bytes: bytes | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        source = model_bytes if model_bytes is not None else str(path)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def __call__(self, noise: Any, label: Any) -> Any:
        import numpy as np

        feeds = {"noise": np.ascontiguousarray(noise, dtype=np.float32), "label": np.asarray(label, dtype=np.int64)}
        return self.session.run([OUTPUT], feeds)[0]
