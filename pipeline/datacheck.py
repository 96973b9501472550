"""Checks a data set must pass before any stage trains on it, each failing with one line naming the file.

What they catch would otherwise surface far downstream: NaN pixels train a NaN model that is saved as a
success, float labels are cast silently, a class with one sample breaks the stratified held-out split in
scikit-learn's words, and a 1-D image array dies inside a net.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import DataError

IMAGE_SHAPES = "(N, D) vectors or (N, C, H, W) images"


def check_images(images: np.ndarray, source: str) -> None:
    if images.dtype == object or not (np.issubdtype(images.dtype, np.number) or images.dtype == bool):
        raise DataError(f"{source}: images must be a numeric array, got dtype {images.dtype}")
    if images.ndim not in (2, 4) or 0 in images.shape[1:]:
        hint = " (add a channel axis: images[:, None])" if images.ndim == 3 else ""
        raise DataError(f"{source}: images must be {IMAGE_SHAPES}, got shape {images.shape}{hint}")
    if np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(images)
        if not finite.all():
            first = int(np.argwhere(~finite)[0][0])
            raise DataError(f"{source}: {int((~finite).sum())} image values are NaN or infinite "
                            f"(first in sample {first}); fix or drop those samples")  # fmt: skip


def check_labels(labels: np.ndarray, n_images: int, source: str) -> int:
    """Integer class ids 0..K-1, every class present, one per image; returns K."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
    if len(labels) != n_images:
        raise DataError(f"{source}: {n_images} images but {len(labels)} labels; they must match one to one")
    if len(labels) == 0:
        raise DataError(f"{source}: no samples")
    if labels.min() < 0:
        raise DataError(f"{source}: labels must be class ids >= 0, found {int(labels.min())}")
    counts = np.bincount(labels)
    if (missing := np.flatnonzero(counts == 0)).size:
        raise DataError(f"{source}: classes {missing.tolist()[:10]} have no samples; labels must be 0..K-1 "
                        "with every class present (renumber them)")  # fmt: skip
    return len(counts)


def check_heldout(labels: np.ndarray, heldout: int, source: str) -> None:
    """The stratified split needs every class in both parts: >= 2 samples each, and room for all classes."""
    counts = np.bincount(labels)
    classes = len(counts)
    if (few := np.flatnonzero(counts < 2)).size:
        raise DataError(f"{source}: classes {few.tolist()[:10]} have fewer than 2 samples; the held-out split "
                        "needs at least one per class on each side")  # fmt: skip
    if heldout < classes or len(labels) - heldout < classes:
        raise DataError(f"{source}: data.heldout = {heldout} leaves {len(labels) - heldout} training samples; "
                        f"both parts need at least one sample of each of the {classes} classes")  # fmt: skip


def check_data(images: np.ndarray, labels: np.ndarray, source: str, heldout: int | None = None) -> int:
    """All checks on one (images, labels) pair; returns the class count."""
    check_images(images, source)
    classes = check_labels(labels, len(images), source)
    if heldout is not None:
        check_heldout(labels, heldout, source)
    return classes
