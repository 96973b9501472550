"""Exported one-step samplers: onnxruntime parity with PyTorch eager per net kind, formats, meta, the CLI,
the registry's ONNX artifact from a bare Python, and the equal-quality speed-up of `eval`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.export import PARITY_ATOL, OnnxSampler, cached_onnx, export_model, meta_path
from pipeline.flow import sample
from pipeline.meanflow import MeanFlowNet
from pipeline.modelio import load_model, model_hash, save_model
from pipeline.msd.router import Router, save_router
from pipeline.nets import NetSpec, build_net
from pipeline.profiles import render_text
from stages.eval import relative_to_teacher
from tests.conftest import ROOT

pytest.importorskip("onnxruntime")
SHAPE, CLASSES = (1, 8, 8), 4
SPECS = {
    "mlp": NetSpec(kind="mlp", width=32, depth=2, emb_dim=8),
    "resmlp": NetSpec(kind="resmlp", width=32, depth=2, emb_dim=8),
    "unet": NetSpec(kind="unet", channels=[8, 16], emb_dim=8),
}


def one_step_folder(root: Path, kind: str) -> Path:
    """A saved one-step model of this net kind (router: two resmlp students, classes {0, 1} and {2, 3};
    meanflow: the average-velocity net on a resmlp backbone, as the meanflow stage saves it)."""
    torch.manual_seed(0)
    name = {"router": "msd@ensemble", "meanflow": "meanflow"}.get(kind, f"distill@{kind}")
    folder = root / "models" / name
    meta = {"stage": folder.name, "data_shape": list(SHAPE), "num_classes": CLASSES}
    if kind == "meanflow":
        net = MeanFlowNet(SPECS["resmlp"], SHAPE, CLASSES)
        save_model(folder, net, {**meta, "kind": "meanflow", "net": SPECS["resmlp"].model_dump()})
    elif kind == "router":
        students = [build_net(SPECS["resmlp"], SHAPE, CLASSES) for _ in range(2)]
        save_router(Router.from_students(students, [[0, 1], [2, 3]], CLASSES), folder,
                    {**meta, "net": SPECS["resmlp"].model_dump()})  # fmt: skip
    else:
        save_model(folder, build_net(SPECS[kind], SHAPE, CLASSES), {**meta, "kind": "onestep",
                                                                    "net": SPECS[kind].model_dump()})  # fmt: skip
    return folder


def eager(folder: Path, noise: np.ndarray, label: np.ndarray) -> np.ndarray:
    """What eval and `slimstep sample` compute in PyTorch, clamped as every user of the samples clamps."""
    net = load_model(folder).net
    with torch.no_grad():
        return sample(net, torch.from_numpy(noise), torch.from_numpy(label), "onestep").x.clamp(-1, 1).numpy()


@pytest.mark.parametrize("kind", ["mlp", "resmlp", "unet", "router", "meanflow"])
def test_onnx_matches_eager_pytorch_at_every_batch_size(tmp_path: Path, kind: str) -> None:
    folder = one_step_folder(tmp_path, kind)
    out = tmp_path / "export" / f"{kind}.onnx"
    info = export_model(folder, "onnx", out)
    runner = OnnxSampler(out, threads=1)
    rng = np.random.default_rng(1)
    for n in (1, 3, 37):  # dynamic batch; n = 1 and 3 leave one router student without samples
        noise = rng.standard_normal((n, *SHAPE)).astype(np.float32)
        label = rng.integers(0, 2 if n == 3 else CLASSES, n).astype(np.int64)
        got, want = runner(noise, label), eager(folder, noise, label)
        assert got.shape == (n, *SHAPE) and got.dtype == np.float32
        assert np.abs(got - want).max() <= PARITY_ATOL, (kind, n, np.abs(got - want).max())
        assert got.min() >= -1 and got.max() <= 1
    assert np.isclose(np.abs(runner(rng.standard_normal((64, *SHAPE)).astype(np.float32) * 3,
                                    np.zeros(64, np.int64))).max(), 1.0)  # the clamp is inside the graph  # fmt: skip
    assert info["data_shape"] == list(SHAPE) and info["value_range"] == [-1.0, 1.0]
    assert info["model_hash"] == model_hash(folder) and info["fd"] is None  # no leaderboard given


class DiffusersVelocity(torch.nn.Module):
    """A random-weight diffusers UNet2DModel behind the velocity interface (as an imported net kind would be)."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        self.unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), **blocks,
                                layers_per_block=1, norm_num_groups=4, num_class_embeds=CLASSES)  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t * 1000, class_labels=label).sample


def test_any_velocity_module_exports_a_diffusers_unet(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from pipeline.export import OneStepGraph, export_net

    net = DiffusersVelocity().eval()
    info = export_net(net, {"data_shape": list(SHAPE), "num_classes": CLASSES}, "onnx", tmp_path / "d.onnx")
    noise = np.random.default_rng(3).standard_normal((6, *SHAPE)).astype(np.float32)
    label = np.arange(6, dtype=np.int64) % CLASSES
    with torch.no_grad():
        want = OneStepGraph(net)(torch.from_numpy(noise), torch.from_numpy(label)).numpy()
    assert np.abs(OnnxSampler(tmp_path / "d.onnx")(noise, label) - want).max() <= PARITY_ATOL
    assert info["exporter"] in ("torchscript", "dynamo")


def test_torchscript_and_safetensors_exports(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = one_step_folder(tmp_path, "resmlp")
    export_model(folder, "torchscript", tmp_path / "s.pt")
    export_model(folder, "safetensors", tmp_path / "s.safetensors")
    noise, label = torch.randn(5, *SHAPE), torch.tensor([0, 1, 2, 3, 0])
    scripted = torch.jit.load(str(tmp_path / "s.pt"))
    assert torch.allclose(scripted(noise, label), torch.from_numpy(eager(folder, noise.numpy(), label.numpy())),
                          atol=PARITY_ATOL)  # fmt: skip
    rebuilt = build_net(NetSpec.model_validate(json.loads(meta_path(tmp_path / "s.safetensors").read_text())["net"]),
                        SHAPE, CLASSES)  # fmt: skip
    rebuilt.load_state_dict(load_file(tmp_path / "s.safetensors"))
    original = load_model(folder).net.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in rebuilt.state_dict().items())


def test_meta_takes_the_fd_from_the_leaderboard_and_flows_are_refused(tmp_path: Path) -> None:
    folder = one_step_folder(tmp_path, "mlp")
    board = tmp_path / "leaderboard.csv"
    pd.DataFrame({"model": ["teacher", "distill@mlp"], "sampler": ["euler-4", "onestep"], "fd": [3.0, 4.5]}).to_csv(
        board, index=False
    )
    info = export_model(folder, "onnx", tmp_path / "m.onnx", board)
    assert info["fd"] == 4.5 and json.loads(meta_path(tmp_path / "m.onnx").read_text())["fd"] == 4.5
    flow = tmp_path / "models/teacher"
    save_model(flow, build_net(SPECS["mlp"], SHAPE, CLASSES), {"stage": "teacher", "kind": "flow",
               "net": SPECS["mlp"].model_dump(), "data_shape": list(SHAPE), "num_classes": CLASSES})  # fmt: skip
    with pytest.raises(ValueError, match="not a one-step generator"):
        export_model(flow, "onnx", tmp_path / "t.onnx")
    with pytest.raises(ValueError, match="allowed onnx, torchscript, safetensors"):
        export_model(folder, "tflite", tmp_path / "m.tflite")


def test_cached_export_is_keyed_by_the_model_hash(tmp_path: Path) -> None:
    folder = one_step_folder(tmp_path, "mlp")
    first = cached_onnx(folder, tmp_path / "cache")
    assert cached_onnx(folder, tmp_path / "cache") == first
    torch.manual_seed(5)  # retrained: new weights, new hash, new file
    save_model(folder, build_net(SPECS["mlp"], SHAPE, CLASSES), load_model(folder).meta)
    assert cached_onnx(folder, tmp_path / "cache") != first


def test_cli_export_and_sample_through_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import app

    one_step_folder(tmp_path, "router")
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    done = cli.invoke(app, ["export", "msd@ensemble", "--format", "onnx", "--out", "out/msd.onnx"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out/msd.onnx").stat().st_size > 0 and (tmp_path / "out/msd.meta.json").exists()
    via_onnx = cli.invoke(app, ["sample", "msd@ensemble", "--n", "8", "--backend", "onnx", "--out", "o.npz"])
    via_torch = cli.invoke(app, ["sample", "msd@ensemble", "--n", "8", "--out", "t.npz"])
    assert via_onnx.exit_code == 0 and via_torch.exit_code == 0, via_onnx.output + via_torch.output
    assert list((tmp_path / "scratch/exports").glob("*.onnx"))  # exported on the fly into the cache
    onnx_x, torch_x = np.load(tmp_path / "o.npz")["images"], np.load(tmp_path / "t.npz")["images"]
    assert np.abs(onnx_x - np.clip(torch_x, -1, 1)).max() <= PARITY_ATOL


def test_registered_onnx_predicts_in_a_python_without_slimstep_or_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from pipeline.tracking import registry

    root = tmp_path / "ws"
    folder = one_step_folder(root, "mlp").rename(root / "models/distill@fgd")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "stage": "distill@fgd"}))
    (root / "models/featurizer").mkdir()
    for name in ("model.pt", "meta.json"):
        (root / "models/featurizer" / name).write_text("{}")
    (root / "params.yaml").write_text(render_text("smoke", ROOT / "configs"))  # the registry describes its data
    (root / "reports").mkdir()
    (root / "reports/metrics.json").write_text(json.dumps({"distill@fgd/onestep": {"fd": 7.5}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("export-test")  # not an active experiment another test left behind in another store
    with mlflow.start_run() as run:
        pass
    done = registry.register_models(run.info.run_id, root, "test")
    assert [d.name for d in done] == ["slimstep-test-onestep"]
    local = Path(mlflow.artifacts.download_artifacts("models:/slimstep-test-onestep@champion", dst_path=str(tmp_path)))
    onnx_file = local / "artifacts/onnx" / registry.ONNX_FILE
    script = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]  # the venv's editable slimstep
class Refuse:  # and nothing of slimstep, torch or mlflow, whatever the environment holds
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pipeline", "stages", "torch", "mlflow"):
            raise ImportError("not allowed here: " + name)
sys.meta_path.insert(0, Refuse())
import json, numpy as np, onnxruntime as ort
meta = json.load(open({str(meta_path(onnx_file))!r}))
session = ort.InferenceSession({str(onnx_file)!r}, providers=["CPUExecutionProvider"])
noise = np.random.default_rng(0).standard_normal((6, *meta["data_shape"])).astype(np.float32)
x = session.run(None, {{"noise": noise, "label": np.arange(6, dtype=np.int64) % meta["num_classes"]}})[0]
assert "torch" not in sys.modules and "pipeline" not in sys.modules
np.save({str(tmp_path / "bare.npy")!r}, x)
print(meta["model_hash"], x.shape, float(x.min()), float(x.max()))
"""
    bare = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.split()[0] == model_hash(folder)
    noise = np.random.default_rng(0).standard_normal((6, *SHAPE)).astype(np.float32)
    want = eager(folder, noise, np.arange(6, dtype=np.int64) % CLASSES)
    assert np.abs(np.load(tmp_path / "bare.npy") - want).max() <= PARITY_ATOL
    pyfunc = mlflow.pyfunc.load_model("models:/slimstep-test-onestep@champion")
    scaled = pyfunc.predict(pd.DataFrame({"label": [0, 1, 2, 3]}))
    assert scaled.min() >= -1 and scaled.max() <= 1  # pyfunc predictions are clamped too


def board(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["model", "sampler", "fd", "samples_per_s"])
    return frame.assign(params=1000.0)


def test_equal_quality_speedup_picks_the_fastest_teacher_sampler_at_least_as_good() -> None:
    result = relative_to_teacher(board([
        ("teacher", "euler-1", 90.0, 8000.0),  # fastest, but worse than every student
        ("teacher", "euler-8", 15.9, 1000.0),
        ("teacher", "heun-4", 15.69, 1200.0),  # as good as fgd and faster than euler-8: fgd's rival
        ("teacher", "dopri5-1e-05", 13.0, 100.0),
        ("distill@fgd", "onestep", 17.67, 24000.0),
        ("distill@naive", "onestep", 15.80, 24000.0),  # euler-8 (15.9) no longer reaches it, heun-4 does
        ("msd@ensemble", "onestep", 12.0, 12000.0),  # better than every teacher sampler
        ("anneal@slimflow", "euler-2", 20.0, 12000.0),  # not one step: no equal-quality figure
    ]))  # fmt: skip
    by = result.set_index("model")
    assert by.loc["distill@fgd", "equal_quality_sampler"] == "heun-4"
    assert by.loc["distill@fgd", "speedup_equal_quality"] == pytest.approx(20.0)
    assert by.loc["distill@fgd", "speedup"] == pytest.approx(240.0)  # the dopri5 ratio stays beside it
    assert by.loc["distill@naive", "equal_quality_sampler"] == "heun-4"
    assert math.isnan(by.loc["msd@ensemble", "speedup_equal_quality"])
    assert by.loc["msd@ensemble", "equal_quality_sampler"].startswith("none: no teacher sampler reaches fd 12")
    assert math.isnan(by.loc["anneal@slimflow", "speedup_equal_quality"])
    assert by.loc["anneal@slimflow", "equal_quality_sampler"] == ""


def test_equal_quality_ties_count_as_reaching_the_student() -> None:
    result = relative_to_teacher(board([("teacher", "euler-4", 10.0, 500.0), ("teacher", "dopri5-1e-05", 9.0, 50.0),
                                        ("distill@fgd", "onestep", 10.0, 5000.0)]))  # fmt: skip
    row = result[result["model"] == "distill@fgd"].iloc[0]
    assert row["equal_quality_sampler"] == "euler-4" and row["speedup_equal_quality"] == pytest.approx(10.0)


@pytest.mark.parametrize("kind", ["resmlp", "unet"])
def test_gemm_rewrite_is_exact_and_int8_quantises_every_weight_layer(tmp_path: Path, kind: str) -> None:
    import onnx

    from pipeline.export import gemm_as_matmul, quantize_int8

    folder = one_step_folder(tmp_path, kind)
    fp32 = tmp_path / "m.onnx"
    export_model(folder, "onnx", fp32)
    rewritten = gemm_as_matmul(onnx.load(str(fp32)))
    assert not [n for n in rewritten.graph.node if n.op_type == "Gemm"]
    onnx.save(rewritten, str(tmp_path / "mm.onnx"))
    int8 = quantize_int8(fp32, tmp_path / "m.int8.onnx")
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops and ("ConvInteger" in ops) == (kind == "unet")
    noise = np.random.default_rng(2).standard_normal((9, *SHAPE)).astype(np.float32)
    label = np.arange(9, dtype=np.int64) % CLASSES
    reference = OnnxSampler(fp32)(noise, label)
    assert np.abs(OnnxSampler(tmp_path / "mm.onnx")(noise, label) - reference).max() <= PARITY_ATOL
    quantised = OnnxSampler(int8)(noise, label)  # int8 rounding: close, not equal, and still in range
    assert 0 < np.abs(quantised - reference).max() < 0.5 and quantised.min() >= -1 and quantised.max() <= 1
