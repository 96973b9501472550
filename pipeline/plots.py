"""Pictures people would rather look at than read: sample grids, 2-D scatters, quality against NFE."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from pipeline.atomic import atomic_write_bytes  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def sample_grid(
    x: Tensor, labels: Tensor, num_classes: int, path: Path, title: str = "", conditional: bool = True,
    class_names: list[str] | None = None,
) -> None:
    """Images (N, C, H, W) in [-1, 1] as one row per class, labelled (by `class_names` when given); unconditional
    images as a plain square-ish mosaic without row labels; 2-D data as a scatter coloured by class."""
    x, labels = x.detach().float().cpu(), labels.cpu()
    if x.dim() == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0], x[:, 1], c=labels, cmap="tab10", s=3)
        ax.set_aspect("equal")
        ax.set_title(title)
        _save(fig, path)
        return
    if not conditional:  # rows are only a layout: ceil(sqrt(N)) images each
        per_row = int(np.ceil(np.sqrt(len(x))))
        labels, num_classes = torch.arange(len(x)) // per_row, int(np.ceil(len(x) / per_row))
    # One mosaic drawn with a single imshow: a subplot per image cost ~1.5 s per grid in eval.
    mosaic = _class_mosaic(((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy(), labels.numpy(), num_classes)
    height, width = x.shape[-2:]
    rows, cols = num_classes, mosaic.shape[1] // (width + 1)
    fig, ax = plt.subplots(figsize=(max(2.0, cols * 0.6), max(2.0, rows * 0.6)))
    ax.imshow(mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")  # fmt: skip
    ax.set_xticks([])
    names = (class_names or [str(c) for c in range(rows)]) if conditional else []
    ax.set_yticks([r * (height + 1) + height / 2 for r in range(len(names))], names, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def _class_mosaic(images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images (N, H, W, C) in [0, 1] tiled one row per class, 1-pixel white gaps; short rows padded with white."""
    height, width, channels = images.shape[1:]
    cols = max(int((labels == c).sum()) for c in range(num_classes))
    mosaic = np.ones((num_classes * (height + 1) - 1, cols * (width + 1) - 1, channels), dtype=np.float32)
    for c in range(num_classes):
        for j, image in enumerate(images[labels == c]):
            top, left = c * (height + 1), j * (width + 1)
            mosaic[top : top + height, left : left + width] = image
    return mosaic


def quality_vs_nfe(board: pd.DataFrame, path: Path, floor: float | None = None) -> None:
    """FD against NFE (log x), one marker per model × sampler, marker area ∝ parameters."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = board[board["nfe"] > 0]
    sizes = 20 + 300 * np.sqrt(rows["params"] / max(rows["params"].max(), 1))
    for model, group in rows.groupby("model", sort=False):
        index = group.index
        ax.scatter(group["nfe"], group["fd"], s=sizes[index], alpha=0.7, label=model)
        ax.errorbar(group["nfe"], group["fd"], yerr=group["fd_std"], fmt="none", ecolor="grey", lw=0.8)
    if floor is not None:
        ax.axhline(floor, ls="--", c="k", lw=0.8, label="real-data floor")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network calls per sample)")
    ax.set_ylabel("FD vs train (lower is better)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    _save(fig, path)
