"""Sample grids: one row per class, one mosaic image (also 2-D data as a scatter); what stages log and eval shows.

Kept apart from the report plots so that restyling a plot never reruns a training stage that logs a grid.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from pipeline.atomic import atomic_write_bytes  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def sample_grid(
    x: Tensor, labels: Tensor, num_classes: int, path: Path, title: str = "", conditional: bool = True,
    class_names: list[str] | None = None,
) -> None:
    """Images (N, C, H, W) in [-1, 1] as one row per class, labelled (by `class_names` when given); unconditional
    images as a square-ish mosaic without row labels; 2-D data as a scatter coloured by class."""
    x = x.detach().float().cpu()
    if x.dim() == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
    else:
        rows, _ = _layout(labels.cpu(), num_classes, conditional)
        rows_n, cols = int(rows.max()) + 1, max(int((rows == r).sum()) for r in range(int(rows.max()) + 1))
        fig, ax = plt.subplots(figsize=(max(2.0, cols * 0.6), max(2.0, rows_n * 0.6)))
    draw_grid(ax, x, labels, num_classes, title, conditional, class_names)
    save_figure(fig, path)


def _layout(labels: Tensor, num_classes: int, conditional: bool) -> tuple[Tensor, int]:
    """The mosaic row of each image and the row count: its class, or (unconditional) rows of ceil(sqrt(N))."""
    if conditional:
        return labels, num_classes
    per_row = int(np.ceil(np.sqrt(len(labels))))
    return torch.arange(len(labels)) // per_row, int(np.ceil(len(labels) / per_row))


def draw_grid(
    ax: plt.Axes, x: Tensor, labels: Tensor, num_classes: int, title: str = "", conditional: bool = True,
    class_names: list[str] | None = None,
) -> None:
    """One model's samples on `ax`: a class-per-row mosaic (images) or a class-coloured scatter (2-D points)."""
    x, labels = x.detach().float().cpu(), labels.cpu()
    if x.dim() == 2:
        ax.scatter(x[:, 0], x[:, 1], c=labels, cmap="tab10", s=3)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        return
    labels, num_classes = _layout(labels, num_classes, conditional)
    # One mosaic drawn with a single imshow: a subplot per image cost ~1.5 s per grid in eval.
    mosaic = _class_mosaic(((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy(), labels.numpy(), num_classes)
    height = x.shape[-2]
    ax.imshow(mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")  # fmt: skip
    ax.set_xticks([])
    names = (class_names or [str(c) for c in range(num_classes)]) if conditional else []
    ax.set_yticks([r * (height + 1) + height / 2 for r in range(len(names))], names, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9)


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
