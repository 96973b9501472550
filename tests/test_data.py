"""Data sets: digits and toy2d splits, save/load, .npz and CIFAR-10 import (pickles refused), minibatch streams."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (
    Dataset,
    RandomBatches,
    Split,
    build_split,
    load_cifar10_split,
    load_digits_split,
    load_npz_split,
    load_split,
    make_toy2d,
    save_split,
    toy2d_centers,
)

TOY2D = {"components": 8, "radius": 4.0, "std": 0.25, "train": 800}


@pytest.fixture(scope="module")
def digits() -> Split:
    return load_digits_split(heldout=360, seed=0)


# Digits.
def test_digits_split_sizes_shape_and_range(digits: Split) -> None:
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.train.shape == digits.test.shape == (1, 8, 8)
    assert digits.train.x.dtype == np.float32 and digits.train.labels.dtype == np.int64
    assert digits.train.num_classes == digits.test.num_classes == 10
    for part in (digits.train, digits.test):
        assert part.x.min() == -1.0 and part.x.max() == 1.0  # pixel 0 -> -1, pixel 16 -> 1
    assert digits.name == "digits"


def test_digits_held_out_set_has_the_train_class_mix(digits: Split) -> None:
    train_counts = np.bincount(digits.train.labels, minlength=10)
    test_counts = np.bincount(digits.test.labels, minlength=10)
    expected = 360 * (train_counts + test_counts) / 1797
    assert np.all(np.abs(test_counts - expected) <= 1)  # stratified, not just random


def test_digits_split_depends_on_seed_only(digits: Split) -> None:
    again, other = load_digits_split(360, 0), load_digits_split(360, 1)
    np.testing.assert_array_equal(again.test.x, digits.test.x)
    assert not np.array_equal(other.test.x, digits.test.x)
    assert len(load_digits_split(100, 0).test) == 100


def test_heldout_as_large_as_the_data_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data.heldout = 1797 must be smaller than the data set \(1797 samples\)"):
        load_digits_split(1797, 0)


# Toy 2-D mixture.
def test_toy2d_labels_are_the_nearest_centre_and_points_lie_in_unit_box() -> None:
    split = make_toy2d(8, 4.0, 0.25, n_train=2000, n_test=500, seed=0)
    centers = toy2d_centers(8, 4.0, 0.25)
    for part in (split.train, split.test):
        assert part.shape == (2,) and part.num_classes == 8 and part.x.dtype == np.float32
        nearest = np.linalg.norm(part.x[:, None] - centers[None], axis=2).argmin(1)
        assert np.mean(nearest == part.labels) > 0.99
        assert np.mean(np.abs(part.x) <= 1.0) > 0.99 and np.abs(part.x).max() < 1.3
        assert set(np.unique(part.labels)) == set(range(8))
    assert (len(split.train), len(split.test)) == (2000, 500)
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 4.0 / 4.75, rtol=1e-6)


def test_toy2d_is_a_function_of_its_seed() -> None:
    a, b, c = (make_toy2d(4, 2.0, 0.1, 50, 10, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.x, c.train.x)


def test_build_split_toy2d_uses_heldout_as_test_size() -> None:
    split = build_split("toy2d", None, heldout=50, seed=0, toy2d=TOY2D)
    assert (len(split.train), len(split.test), split.name) == (800, 50, "toy2d")


# Save / load.
def test_save_load_round_trip_and_metadata(tmp_path: Path) -> None:
    split = make_toy2d(4, 2.0, 0.1, 60, 20, seed=0)
    save_split(split, tmp_path / "data")
    loaded = load_split(tmp_path / "data")
    for before, after in ((split.train, loaded.train), (split.test, loaded.test)):
        np.testing.assert_array_equal(before.x, after.x)
        np.testing.assert_array_equal(before.labels, after.labels)
        assert after.x.dtype == np.float32 and after.num_classes == 4
    assert loaded.name == "toy2d"
    meta = json.loads((tmp_path / "data/meta.json").read_text())
    assert meta["n_train"] == 60 and meta["n_test"] == 20 and meta["shape"] == [2]
    assert meta["class_counts_train"] == np.bincount(split.train.labels, minlength=4).tolist()
    assert "t=0" in meta["time_convention"]
    with np.load(tmp_path / "data/train.npz", allow_pickle=False) as arrays:  # no pickles in data files
        assert set(arrays.files) == {"x", "labels"}


def test_saved_split_is_byte_identical_at_another_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = make_toy2d(4, 2.0, 0.1, 60, 20, seed=0)
    save_split(split, tmp_path / "a")
    later = time.time() + 3 * 86400
    monkeypatch.setattr(time, "time", lambda: later)  # zip entries must not carry a timestamp
    save_split(split, tmp_path / "b")
    for name in ("train.npz", "test.npz", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# Imported .npz files.
def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_in_0_255_is_scaled_to_unit_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 1, 4, 4)).astype(np.uint8)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0, 255
    labels = np.repeat(np.arange(4), 10)
    split = load_npz_split(write_npz(tmp_path / "mine.npz", images=images, labels=labels), heldout=8, seed=0)
    assert (len(split.train), len(split.test)) == (32, 8)
    assert split.train.shape == (1, 4, 4) and split.train.num_classes == 4 and split.name == "mine"
    both = np.concatenate([split.train.x, split.test.x])
    assert both.dtype == np.float32 and both.min() == -1.0 and both.max() == 1.0
    assert np.all(np.bincount(split.test.labels) == 2)  # stratified
    expected = np.sort(images.astype(np.float32).ravel() / 127.5 - 1.0)
    np.testing.assert_allclose(np.sort(both.ravel()), expected, atol=1e-6)


def test_npz_already_in_unit_range_is_kept(tmp_path: Path) -> None:
    images = np.linspace(-1, 1, 20 * 3, dtype=np.float32).reshape(20, 3)
    labels = np.tile([0, 1], 10)
    split = load_npz_split(write_npz(tmp_path / "flat.npz", images=images, labels=labels), heldout=4, seed=0)
    np.testing.assert_allclose(np.sort(np.concatenate([split.train.x, split.test.x]).ravel()), images.ravel())


def test_npz_with_unknown_arrays_names_them_and_what_is_allowed(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "bad.npz", images=np.zeros((10, 2)), targets=np.zeros(10))
    with pytest.raises(ValueError, match=r"has arrays \['images', 'targets'\]; allowed: images, labels \(optional"):
        load_npz_split(path, heldout=2, seed=0)


def test_npz_without_labels_is_unconditional_and_split_unstratified(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "flat.npz", images=np.linspace(0, 255, 10 * 2).reshape(10, 2))
    split = load_npz_split(path, heldout=3, seed=0)
    assert not split.train.conditional and split.train.num_classes == 1 and set(split.test.labels.tolist()) == {0}
    assert (len(split.train), len(split.test)) == (7, 3)


def test_npz_out_of_range_images_are_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "neg.npz", images=np.full((10, 2), -5.0) + np.arange(10)[:, None] * 30,
                     labels=np.tile([0, 1], 5))  # fmt: skip
    with pytest.raises(ValueError, match=r"\[0, 255\] or \[-1, 1\]"):
        load_npz_split(path, heldout=2, seed=0)


def test_npz_with_object_arrays_is_not_unpickled(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "obj.npz", images=np.array([{"a": 1}] * 4, dtype=object), labels=np.zeros(4))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz_split(path, heldout=2, seed=0)


def test_missing_npz_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "inputs" / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz.*slimstep import-data"):
        load_npz_split(path, heldout=2, seed=0)


@pytest.mark.parametrize("dataset", ["cifar10", "npz"])
def test_build_split_needs_a_path_for_file_datasets(dataset: str) -> None:
    with pytest.raises(ValueError, match=f"data.path is required for data.dataset = {dataset}.*import-data"):
        build_split(dataset, None, heldout=10, seed=0, toy2d=TOY2D)


def test_build_split_reads_an_npz_relative_to_the_working_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "inputs").mkdir()
    write_npz(tmp_path / "inputs/x.npz", images=np.zeros((10, 2), np.float32), labels=np.tile([0, 1], 5))
    monkeypatch.chdir(tmp_path)
    assert len(build_split("npz", "inputs/x.npz", heldout=4, seed=0, toy2d=TOY2D).test) == 4


# CIFAR-10 python batches.
class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as the real cifar-10-batches-py files (cPickle, protocol 2) are."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_str8(self, obj: bytes) -> None:
        size = len(obj)
        opcode = pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else pickle.BINSTRING + struct.pack("<i", size)
        self.write(opcode + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str8


def cifar_batch(n: int, seed: int) -> tuple[dict[bytes, object], np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072)).astype(np.uint8)
    data[0, :2] = [0, 255]
    return {b"batch_label": b"batch", b"data": data, b"labels": [int(v) for v in rng.integers(0, 10, n)]}, data


def write_python2_pickle(path: Path, entry: object) -> None:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(entry)
    # numpy 1.x (which wrote the real files) named the reconstructor numpy.core.multiarray
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


@pytest.fixture
def cifar_folder(tmp_path: Path) -> tuple[Path, dict[str, dict[bytes, object]]]:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    entries = {}
    for name, n, seed in (("data_batch_1", 5, 1), ("data_batch_2", 3, 2), ("test_batch", 4, 3)):
        entries[name], _ = cifar_batch(n, seed)
        write_python2_pickle(folder / name, entries[name])
    (folder / "batches.meta").write_bytes(b"not read")
    return folder, entries


def test_cifar10_folder_loads_as_images_in_unit_range(cifar_folder: tuple[Path, dict]) -> None:
    folder, entries = cifar_folder
    assert b"numpy.core.multiarray" in (folder / "data_batch_1").read_bytes()  # the real files' layout
    split = load_cifar10_split(folder)
    assert split.train.x.shape == (8, 3, 32, 32) and split.test.x.shape == (4, 3, 32, 32)
    assert split.train.x.dtype == np.float32 and split.train.num_classes == 10 and split.name == "cifar10"
    assert split.train.x.min() == -1.0 and split.train.x.max() == 1.0
    first = entries["data_batch_1"][b"data"][0].reshape(3, 32, 32)  # rows are R plane, G plane, B plane
    np.testing.assert_allclose(split.train.x[0], first / 127.5 - 1.0, atol=1e-6)
    labels = entries["data_batch_1"][b"labels"] + entries["data_batch_2"][b"labels"]
    assert split.train.labels.tolist() == labels and split.train.labels.dtype == np.int64
    assert split.test.labels.tolist() == entries["test_batch"][b"labels"]


def test_build_split_reads_a_cifar10_folder(cifar_folder: tuple[Path, dict]) -> None:
    folder, _ = cifar_folder
    assert len(build_split("cifar10", str(folder), heldout=360, seed=0, toy2d=TOY2D).train) == 8


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_cifar10_pickle_with_code_is_refused(cifar_folder: tuple[Path, dict], tmp_path: Path) -> None:
    folder, _ = cifar_folder
    marker = tmp_path / "pwned"
    entry, _ = cifar_batch(2, 0)
    entry[b"labels"] = Exploit(marker)
    write_python2_pickle(folder / "data_batch_2", entry)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os)\.system"):
        load_cifar10_split(folder)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_batches_repickled_by_python3_load(cifar_folder: tuple[Path, dict], protocol: int) -> None:
    folder, entries = cifar_folder
    (folder / "data_batch_2").write_bytes(pickle.dumps(entries["data_batch_2"], protocol=protocol))
    assert load_cifar10_split(folder).train.x.shape == (8, 3, 32, 32)


def test_cifar10_missing_folder_or_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_cifar10_split(tmp_path / "absent")
    (tmp_path / "partial").mkdir()
    write_python2_pickle(tmp_path / "partial/data_batch_1", cifar_batch(2, 0)[0])
    with pytest.raises(FileNotFoundError, match="expected data_batch_1..5 and test_batch"):
        load_cifar10_split(tmp_path / "partial")


# Minibatch streams.
@pytest.fixture
def small() -> Dataset:
    x = np.arange(50 * 2, dtype=np.float32).reshape(50, 2) / 100
    return Dataset(x, np.arange(50) % 5, 5)


def test_batch_k_depends_only_on_seed_and_k(small: Dataset) -> None:
    stream = RandomBatches(small, 6, seed=7)
    batches = [next(stream) for _ in range(5)]
    torch.manual_seed(123)  # the global RNG plays no part
    jumped = RandomBatches(small, 6, seed=7)
    jumped.load_state_dict({"step": 3})
    batch = next(jumped)
    assert torch.equal(batch.x, batches[3].x) and torch.equal(batch.label, batches[3].label)
    assert batch.z is None and batch.x.shape == (6, 2) and batch.label.dtype == torch.int64
    assert not torch.equal(batches[0].x, batches[1].x)
    other = next(RandomBatches(small, 6, seed=8))
    assert not torch.equal(other.x, batches[0].x)


def test_batches_pair_images_with_their_labels(small: Dataset) -> None:
    batch = next(RandomBatches(small, 20, seed=0))
    rows = (batch.x[:, 0] * 100 / 2).round().long()  # row index of each sampled point
    assert torch.equal(batch.label, rows % 5)


def test_state_dict_resume_gives_the_same_next_batch(small: Dataset) -> None:
    stream = RandomBatches(small, 4, seed=0)
    for _ in range(3):
        next(stream)
    state = stream.state_dict()
    assert state == {"step": 3}
    expected = next(stream)
    resumed = RandomBatches(small, 4, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed).x, expected.x) and resumed.state_dict() == {"step": 4}
