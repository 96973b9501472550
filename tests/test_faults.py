"""The fault suite: each bad input or damaged file ends in one clear line naming it, and nothing is lost.

Unit level where the fault lives in one module; a few cases run a real stage or `slimstep` command in a
small project copy (no pipeline run needed), to show what a user sees on the terminal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn

from pipeline import tracking
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import ParamsError, TrainSection, validate_params
from pipeline.data import Dataset, RandomBatches, Split, load_npz_split, load_split, save_split
from pipeline.errors import DataError, DeviceError, IntegrityError, NonFiniteError, readable_errors
from pipeline.flow import Batch, RectifiedFlowLoss
from pipeline.modelio import load_model, load_weights, save_model
from pipeline.nets import NetSpec, build_net
from pipeline.orchestration.devices import DevicePool
from pipeline.orchestration.flowlock import FLOW_ENV, FlowRunning, identity, one_flow
from pipeline.pairs import PairStream, generate_pairs, load_metadata
from pipeline.runtime import resolve_device
from pipeline.tracking import worker as tracking_worker
from pipeline.training import train
from tests.conftest import ROOT, make_project, run

SPEC = NetSpec(kind="mlp", width=16, depth=1, emb_dim=8)
PYTHON = sys.executable


def settings(**overrides: Any) -> TrainSection:
    base = dict(steps=20, batch_size=8, lr=1e-3, seed=0, checkpoint_every=5, log_every=5, amp=False)
    return TrainSection(**(base | overrides))


def dataset(n: int = 64, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.uniform(-1, 1, (n, 2)).astype(np.float32), rng.integers(0, 4, n).astype(np.int64), 4)


def fresh_net(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return build_net(SPEC.model_copy(update={"width": width}), (2,), 4)


def fit(data: Dataset, cfg: TrainSection, net: nn.Module | None = None, **kwargs: Any):  # noqa: ANN201
    batches = RandomBatches(data, cfg.batch_size, cfg.seed)
    return train(net or fresh_net(), RectifiedFlowLoss(), batches, cfg, progress=False, **kwargs)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def flip_bytes(path: Path, count: int = 64) -> None:
    """Flip `count` bytes in the middle of a file (its size stays the same)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(len(data), middle + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line(text: str) -> str:
    """The error lines a user sees; asserts there is exactly one and no traceback."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error")]
    assert len(lines) == 1, text
    return lines[0]


# 1. Never save a non-finite model.


def test_non_finite_data_stops_training_naming_the_step_and_the_likely_cause(tmp_path: Path) -> None:
    data = dataset()
    data.x[5, 0] = np.nan
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(NonFiniteError) as caught:
        fit(data, settings(), checkpoint=checkpoint)
    message = str(caught.value)
    assert "the loss is nan at step" in message and "non-finite values in the data" in message
    assert "lr = 0.001" in message and "nothing was saved" in message
    state = load_checkpoint(checkpoint)  # any checkpoint written before the NaN holds only finite weights
    assert state is None or all(torch.isfinite(v).all() for v in state["net"].values())


def test_a_loss_that_turns_nan_midway_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    class TurnsNan(RectifiedFlowLoss):
        def __call__(self, net: nn.Module, batch: Batch, step: int) -> Tensor:
            value = super().__call__(net, batch, step)
            return value * float("inf") if step == 12 else value

    checkpoint, cfg = tmp_path / "checkpoint.pt", settings()
    with pytest.raises(NonFiniteError, match="at step 13 of 20"):
        train(fresh_net(), TurnsNan(), RandomBatches(dataset(), 8, 0), cfg, checkpoint=checkpoint, progress=False)
    state = load_checkpoint(checkpoint)
    assert state is not None and state["step"] == 10  # the work before the fault is kept


def test_save_model_refuses_non_finite_weights_and_writes_nothing(tmp_path: Path) -> None:
    net = fresh_net()
    with torch.no_grad():
        net.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"weight 'layers\.0\.weight' is not finite"):
        save_model(tmp_path / "teacher", net, {"stage": "teacher", "kind": "flow"})
    assert not (tmp_path / "teacher").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [("distill.guidance_weight", float("inf")), ("teacher.lr", float("nan")), ("msd.regression_weight", -1.0)],
)
def test_non_finite_or_negative_weights_are_refused_naming_the_key(key: str, value: float) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    section, leaf = key.split(".")
    raw[section][leaf] = value
    with pytest.raises(ParamsError) as caught:
        validate_params(raw)
    assert f"{key} = {value!r}" in str(caught.value)


# 2. Integrity on every artifact.


def saved_model(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "teacher"
    meta = {"stage": "teacher", "kind": "flow", "net": SPEC.model_dump(), "data_shape": [2], "num_classes": 4}
    save_model(folder, fresh_net(), meta, extra={"raw.pt": fresh_net().state_dict()})
    return folder


def test_model_meta_records_a_sha256_per_file(tmp_path: Path) -> None:
    folder = saved_model(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["sha256"]) == {"model.pt", "raw.pt"}
    assert same_weights(load_model(folder).net, fresh_net())


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
@pytest.mark.parametrize("name", ["model.pt", "raw.pt"])
def test_a_damaged_model_file_is_one_line_naming_it_and_the_rebuild(tmp_path: Path, damage: str, name: str) -> None:
    folder = saved_model(tmp_path)
    path = folder / name
    if damage == "flip":
        flip_bytes(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(b"not a zip" * 50)
    with pytest.raises(IntegrityError) as caught:
        load_weights(folder, name) if name == "raw.pt" else load_model(folder)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and "`dvc repro teacher`" in message and f"dvc checkout {folder}" in message
    assert "\n" not in message and "weights_only" not in message


def test_unreadable_model_metadata_names_the_file(tmp_path: Path) -> None:
    folder = saved_model(tmp_path)
    (folder / "meta.json").write_text('{"kind": "flow", ')
    with pytest.raises(IntegrityError, match=r"meta\.json: not valid JSON .*dvc repro teacher"):
        load_model(folder)


def test_weights_of_another_net_are_one_line(tmp_path: Path) -> None:
    folder = saved_model(tmp_path)
    other = tmp_path / "other"
    save_model(other, fresh_net(width=8), {"stage": "teacher", "kind": "flow"})
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "model.pt").write_bytes((other / "model.pt").read_bytes())
    meta["sha256"]["model.pt"] = json.loads((other / "meta.json").read_text())["sha256"]["model.pt"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="weights do not fit the net its meta.json describes"):
        load_model(folder)


class Linear:
    def __call__(self, x_t: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return x_t * 0.5 + label.reshape(-1, 1).float()


def pairs(root: Path, **kw: Any) -> Any:
    return generate_pairs(Linear(), root, 12, 4, 2, "euler-2", 3, (2,), 3, progress=False, **kw)


def test_pair_shards_record_sha256_and_a_damaged_shard_fails_streaming_by_name(tmp_path: Path) -> None:
    root = tmp_path / "pairs" / "teacher"
    pairs(root)
    entries = load_metadata(root)["shards"]
    assert all(len(e["sha256"]) == 64 for e in entries)
    flip_bytes(root / entries[1]["file"], 16)
    stream = PairStream(root, batch_size=4, seed=0)
    with pytest.raises(IntegrityError) as caught:
        list(stream.epoch_iter(0))
    assert str(caught.value).startswith(str(root / entries[1]["file"]))
    assert "`dvc repro pairs@teacher`" in str(caught.value)


def test_shard_resume_checks_hashes_not_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    pairs(root)
    original = {p.name: p.read_bytes() for p in root.iterdir()}
    flip_bytes(root / "shard-00001.pt", 16)  # same size: the old size check reused it
    pairs(root)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == original  # regenerated byte for byte
    assert "shard-00001.pt does not match its recorded sha256" in capsys.readouterr().err


def test_unreadable_pair_metadata_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "pairs" / "teacher"
    pairs(root)
    (root / "metadata.json").write_text("{")
    with pytest.raises(IntegrityError, match=r"metadata\.json: not valid JSON .*dvc repro pairs@teacher"):
        PairStream(root, batch_size=4, seed=0)


def split_in(folder: Path) -> Path:
    data = dataset()
    save_split(Split(data, dataset(16, seed=1), "toy"), folder)
    return folder


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_data_split_names_the_file_and_the_rebuild(tmp_path: Path, damage: str) -> None:
    folder = split_in(tmp_path / "data")
    path = folder / "train.npz"
    flip_bytes(path, 8) if damage == "flip" else path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(IntegrityError) as caught:
        load_split(folder)
    assert str(caught.value).startswith(f"{path}:") and "`dvc repro data`" in str(caught.value)
    assert load_split(split_in(tmp_path / "clean")).train.x.shape == (64, 2)


# 3. Checkpoints are a cache.


def corrupt_checkpoint(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "flipped":
        flip_bytes(path)
    elif how == "no hash":
        path.with_name(path.name + ".sha256").unlink()
    elif how == "pickle":  # a hand-made file with a valid hash that is not a training state
        save_checkpoint({"format_version": 1, "note": "not a state"}, path)


@pytest.mark.parametrize("how", ["garbage", "truncated", "flipped", "no hash", "pickle"])
def test_unusable_checkpoint_is_set_aside_and_the_stage_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    data, cfg, checkpoint = dataset(), settings(), tmp_path / "checkpoint.pt"
    fit(data, cfg, checkpoint=checkpoint, stop_after=10)
    corrupt_checkpoint(checkpoint, how)
    result = fit(data, cfg, checkpoint=checkpoint)
    assert result.resumed_from == 0 and same_weights(result.net, fit(data, cfg).net)
    warning = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert len(warning) == 1 and warning[0].startswith(f"warning: checkpoint {checkpoint}")
    assert "set aside as checkpoint.pt.bad" in warning[0] and "weights_only" not in warning[0]
    assert (tmp_path / "checkpoint.pt.bad").exists()


def test_checkpoint_of_another_net_is_set_aside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, cfg, checkpoint = dataset(), settings(), tmp_path / "checkpoint.pt"
    fit(data, cfg, net=fresh_net(width=8), checkpoint=checkpoint, stop_after=10)  # e.g. params edited by hand
    result = fit(data, cfg, checkpoint=checkpoint)
    assert result.resumed_from == 0 and same_weights(result.net, fit(data, cfg).net)
    assert "does not fit this run" in capsys.readouterr().err


# 4. Data validation.


def npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def good_arrays(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (n, 1, 4, 4)).astype(np.float32), np.arange(n) % 4


BAD_DATA = {
    "nan pixel": (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y), "NaN or infinite"),
    "float labels": (lambda x, y: (x, y.astype(np.float32) + 0.5), "1-D integer array"),
    "negative label": (lambda x, y: (x, np.where(np.arange(len(y)) == 3, -1, y)), "class ids >= 0"),
    "count mismatch": (lambda x, y: (x, y[:-2]), "40 images but 38 labels"),
    "one sample class": (lambda x, y: (x, np.where(np.arange(len(y)) == 0, 4, y)), "fewer than 2 samples"),
    "missing class": (lambda x, y: (x, np.where(y == 2, 3, y)), "have no samples"),
    "1-D images": (lambda x, y: (x.reshape(len(x), -1)[:, 0], y), "must be (N, D) vectors or (N, C, H, W)"),
    "3-D images": (lambda x, y: (x[:, 0], y), "add a channel axis"),
    "text images": (lambda x, y: (np.array(["a"] * len(y)), y), "numeric array"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_npz_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    change, expected = BAD_DATA[case]
    path = npz(tmp_path / "mine.npz", *change(*good_arrays()))
    with pytest.raises(DataError) as caught:
        load_npz_split(path, heldout=8, seed=0)
    assert str(caught.value).startswith(f"{path}:") and expected in str(caught.value)


def test_object_and_truncated_npz_are_refused_naming_the_file(tmp_path: Path) -> None:
    x, y = good_arrays()
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=np.array([object()] * 40, dtype=object), labels=y)
    truncated = npz(tmp_path / "cut.npz", x, y)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (pickled, truncated):
        with pytest.raises(DataError, match=rf"^{path}: not a readable \.npz"):
            load_npz_split(path, heldout=8, seed=0)


def test_heldout_too_small_for_the_classes_is_refused(tmp_path: Path) -> None:
    path = npz(tmp_path / "mine.npz", *good_arrays())
    with pytest.raises(DataError, match="data.heldout = 2 .* each of the 4 classes"):
        load_npz_split(path, heldout=2, seed=0)
    assert len(load_npz_split(path, heldout=8, seed=0).test) == 8


@pytest.mark.parametrize(
    ("key", "value"),
    [("data.path", "../../../etc/passwd"), ("data.path", "/etc/passwd"), ("data.path", "data/train.npz"),
     ("pairs.sets.teacher.flow", "../other/models/teacher"), ("distill.lpips_weights", "/root/vgg.pth")],
)  # fmt: skip
def test_paths_must_stay_inside_the_repository(key: str, value: str) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ParamsError) as caught:
        validate_params(raw)
    assert f"{key} = {value!r}" in str(caught.value) and ("inside the repository" in str(caught.value)
                                                           or "under inputs/" in str(caught.value))  # fmt: skip


# 5. Cross-field checks and one readable message.


def test_more_msd_students_than_classes_is_refused_before_any_stage() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["msd"]["students"] = list(range(11))
    with pytest.raises(ParamsError, match="msd.students: 11 students for the 10 classes"):
        validate_params(raw)


def test_unknown_sampler_is_refused_naming_the_key() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["eval"]["flow_samplers"] = ["euler-4", "rk9-3"]
    with pytest.raises(ParamsError, match=r"eval.flow_samplers"):
        validate_params(raw)


def test_missing_cuda_is_one_line_and_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped, readable_errors("teacher"):
        resolve_device("cuda")
    assert stopped.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: teacher: params.yaml device = cuda, but torch sees no CUDA device")
    monkeypatch.setenv("SLIMSTEP_DEBUG", "1")
    with pytest.raises(DeviceError), readable_errors("teacher"):
        resolve_device("cuda")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh smoke-profile project (no pipeline run): enough for single stages and `slimstep` commands."""
    return make_project(tmp_path_factory.mktemp("faults") / "repo")


def stage_env(**extra: str) -> dict[str, str]:
    return {"SLIMSTEP_TRACKING": "off", "PYTHONPATH": str(ROOT), **extra}


def test_data_stage_refuses_a_bad_npz_in_one_line(project: Path) -> None:
    x, y = good_arrays()
    (project / "inputs").mkdir(exist_ok=True)
    npz(project / "inputs" / "bad.npz", x, y.astype(np.float64))
    params = project / "bad-params.yaml"
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["data"].update(dataset="npz", path="inputs/bad.npz", heldout=8)
    params.write_text(yaml.safe_dump(raw))
    done = run([PYTHON, "-m", "stages", "data"], project, env=stage_env(SLIMSTEP_PARAMS=str(params)), check=False)
    assert done.returncode != 0
    expected = "error: inputs/bad.npz: labels must be a 1-D integer array, got dtype float64 shape (40,)"
    assert one_line(done.stderr) == expected
    assert not (project / "data").exists()  # nothing half-written


def test_import_data_refuses_a_bad_npz_before_copying(project: Path, tmp_path: Path) -> None:
    x, y = good_arrays()
    x[0, 0, 0, 0] = np.inf
    source = npz(tmp_path / "mine.npz", x, y)
    done = run(["slimstep", "import-data", str(source)], project, env=stage_env(), check=False)
    assert done.returncode == 2 and "NaN or infinite" in done.stdout and "nothing was imported" in done.stdout
    assert not (project / "inputs" / "mine.npz").exists()


def test_stage_on_missing_cuda_is_one_line_no_traceback(project: Path) -> None:
    params = project / "cuda-params.yaml"
    params.write_text((project / "params.yaml").read_text().replace("device: auto", "device: cuda"))
    env = stage_env(SLIMSTEP_PARAMS=str(params), CUDA_VISIBLE_DEVICES="")
    done = run([PYTHON, "-m", "stages", "teacher"], project, env=env, check=False)
    assert done.returncode == 1
    assert "torch sees no CUDA device here" in one_line(done.stderr)


# 6. Tracking is never on the critical path.


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fresh_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "_problems", {})


def test_dead_tracking_server_costs_seconds_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh_probes: None
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv(tracking.DISABLE_ENV, "on")
    started = time.perf_counter()
    assert not tracking.enabled() and not tracking.enabled()
    assert tracking.start_pipeline_run("repro-smoke", {}) is None
    with tracking.stage_run("teacher", {}, {}) as tracker:
        assert isinstance(tracker, tracking.NullTracker)
    assert time.perf_counter() - started < 5
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "cannot connect to 127.0.0.1" in warnings[0] and "every output is kept" in warnings[0]
    assert tracking.child_env() == {tracking.DISABLE_ENV: "off"}  # the stages it starts do not probe again


def test_required_tracking_fails_fast(monkeypatch: pytest.MonkeyPatch, fresh_probes: None) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv(tracking.DISABLE_ENV, "required")
    with pytest.raises(tracking.TrackingUnavailable, match="SLIMSTEP_TRACKING=required: nothing was run"):
        tracking.enabled()


def test_read_only_store_is_found_by_the_probe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_probes: None
) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    assert tracking.store_problem(f"sqlite:///{db}") is None
    real_access = os.access  # the tests run as root, for whom chmod 444 does not stop writes
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != db and real_access(p, mode))
    assert tracking.store_problem(f"sqlite:///{db}") == f"{db} is read-only"


def test_a_store_that_breaks_mid_run_warns_once_and_stops_logging(capsys: pytest.CaptureFixture[str]) -> None:
    class Failing:
        calls = 0

        def log_batch(self, *args: Any, **kwargs: Any) -> None:
            self.calls += 1
            raise OSError("attempt to write a readonly database")

    tracker = tracking.MlflowTracker.__new__(tracking.MlflowTracker)
    tracker.run_id, tracker._client, tracker.broken = "r", Failing(), False
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0}, step)
    assert tracker._client.calls == 1
    assert capsys.readouterr().err.count("warning: MLflow logging failed (attempt to write a readonly database)") == 1


def test_helper_that_cannot_open_its_run_drains_its_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*_: Any) -> None:
        raise OSError("readonly database")

    monkeypatch.setattr(tracking_worker, "warm_up", lambda: None)
    monkeypatch.setattr(tracking, "open_stage_run", refuse)
    lines = [{"op": "start", "stage": "teacher", "params": {}, "tags": {}}, {"op": "metrics", "metrics": {}, "step": 1},
             {"op": "end", "status": "FINISHED"}]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", iter(json.dumps(line) + "\n" for line in lines))
    tracking_worker.main()
    assert "warning: MLflow run of teacher not created (readonly database)" in capsys.readouterr().err


# 7. One flow per checkout.


def test_second_flow_in_a_checkout_refuses_naming_the_first(tmp_path: Path) -> None:
    with one_flow(tmp_path, "slimstep run") as env:
        assert env[FLOW_ENV] == identity()
        with pytest.raises(FlowRunning) as caught, one_flow(tmp_path, "slimstep repro"):
            pass
        assert str(caught.value).startswith(f"`slimstep run` (pid {os.getpid()}, since ")
    with one_flow(tmp_path, "slimstep repro"):  # released at the end
        pass


HOLD_LOCK = """
import sys, time
from pathlib import Path
from pipeline.orchestration.flowlock import one_flow
with one_flow(Path(sys.argv[1]), "slimstep run"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_killed_flow_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen([PYTHON, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FlowRunning, match=f"pid {holder.pid}"), one_flow(tmp_path, "slimstep run"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with one_flow(tmp_path, "slimstep run"):
        pass


def test_slimstep_repro_refuses_while_a_flow_runs(project: Path) -> None:
    with one_flow(project, "slimstep run"):
        started = time.perf_counter()
        done = run(["slimstep", "repro"], project, env=stage_env(), check=False)
    assert done.returncode == 1 and time.perf_counter() - started < 30
    assert "`slimstep run` (pid" in done.stdout and "is already running in" in done.stdout


STAGE = """
import time
from pipeline.orchestration.flowlock import stop_with_flow
stop_with_flow(poll_s=0.1)
print("stage running", flush=True)
time.sleep(60)
"""


def test_a_stage_stops_when_its_flow_is_killed() -> None:
    flow = subprocess.Popen(["sleep", "60"])
    stage = subprocess.Popen(
        [PYTHON, "-c", STAGE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), FLOW_ENV: identity(flow.pid)},
    )  # fmt: skip
    try:
        assert stage.stdout is not None and stage.stdout.readline().strip() == "stage running"
        assert stage.poll() is None
        flow.kill()
        flow.wait()
        assert stage.wait(timeout=10) == 143
        assert stage.stderr is not None and "is gone; stopping" in stage.stderr.read()
    finally:
        for proc in (flow, stage):
            if proc.poll() is None:
                proc.kill()


TAKE_AND_DIE = """
import os, subprocess, sys
from pathlib import Path
from pipeline.orchestration.devices import DevicePool
pool = DevicePool(("cpu0", "cpu1"), folder=Path(sys.argv[1]))
with pool.take() as device:
    child = subprocess.Popen(["sleep", "60"], pass_fds=(pool.fd(device),), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    print(child.pid, flush=True)
    os._exit(9)  # the flow dies (kill -9) while its stage runs
"""


def test_a_device_stays_held_while_the_stage_of_a_killed_flow_lives(tmp_path: Path) -> None:
    done = subprocess.run([PYTHON, "-c", textwrap.dedent(TAKE_AND_DIE), str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)  # fmt: skip
    stage_pid = int(done.stdout.strip())
    pool = DevicePool(("cpu0", "cpu1"), folder=tmp_path)
    try:
        assert pool.held() == 1  # the orphaned stage still holds its device
    finally:
        os.kill(stage_pid, signal.SIGKILL)
    deadline = time.time() + 5
    while pool.held() and time.time() < deadline:
        time.sleep(0.05)
    assert pool.held() == 0
