"""Report pictures: quality against NFE, and every model's samples side by side on the same noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from torch import Tensor  # noqa: E402

from pipeline.grids import draw_grid, save_figure  # noqa: E402

DODGE = 0.05  # decades of NFE between models plotted at the same NFE (one-step models all sit at 1)


def _marker_area(params: pd.Series | np.ndarray, largest: float) -> np.ndarray:
    return 20 + 300 * np.sqrt(np.asarray(params, dtype=float) / max(largest, 1.0))


def _dodged_nfe(rows: pd.DataFrame) -> pd.Series:
    """Spread models that share an NFE sideways (log axis) so one-step students do not hide each other."""
    shifted = rows["nfe"].astype(float).copy()
    for _, group in rows.groupby("nfe"):
        models = list(dict.fromkeys(group["model"]))
        for index, model in zip(group.index, group["model"], strict=True):
            offset = (models.index(model) - (len(models) - 1) / 2) * DODGE
            shifted[index] = float(rows.loc[index, "nfe"]) * 10**offset
    return shifted


def quality_vs_nfe(board: pd.DataFrame, path: Path, floor: float | None = None) -> None:
    """FD against NFE, both log scale; one marker per model × sampler, area ∝ √parameters (size legend).

    Log FD keeps a poor point (the teacher at Euler-1) from squeezing every one-step model into one blob;
    the teacher's points carry their sampler's name; models sharing an NFE are nudged apart sideways.
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    rows = board[(board["nfe"] > 0) & (board["fd"] > 0)].copy()
    largest = float(rows["params"].max()) if len(rows) else 1.0
    rows["x"] = _dodged_nfe(rows)
    for model, group in rows.groupby("model", sort=False):
        ax.scatter(group["x"], group["fd"], s=_marker_area(group["params"], largest), alpha=0.75, label=model,
                   edgecolors="k", linewidths=0.4, zorder=3)  # fmt: skip
        ax.errorbar(group["x"], group["fd"], yerr=group["fd_std"].fillna(0), fmt="none", ecolor="grey", lw=0.8)
        if model == "teacher":
            for i, (x, fd, sampler) in enumerate(zip(group["x"], group["fd"], group["sampler"], strict=True)):
                below = i % 2 == 0  # alternate below / above: neighbouring NFEs would overlap their labels
                ax.annotate(sampler, (x, fd), xytext=(0, -16 if below else 12), textcoords="offset points",
                            fontsize=7, ha="center", color="0.15", zorder=5,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
    if floor is not None and floor > 0:
        ax.axhline(floor, ls="--", c="k", lw=0.8, label="real-data floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted(set(rows["nfe"].astype(float).round(1)))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("NFE (network calls per sample, log)")
    ax.set_ylabel("FD vs train (log, lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Quality against sampling cost", fontsize=10)
    fig.subplots_adjust(right=0.72)
    models = fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(0.74, 0.88),
                        title="model (colour)", title_fontsize=8)  # fmt: skip
    for handle in models.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([40])  # colour only: size has its own legend
    sizes = sorted({int(p) for p in _round_sizes(rows["params"])})
    handles = [ax.scatter([], [], s=_marker_area([p], largest), c="none", edgecolors="k", linewidths=0.6)
               for p in sizes]  # fmt: skip
    fig.legend(handles, [f"{p:,}" for p in sizes], fontsize=7, loc="lower left", bbox_to_anchor=(0.74, 0.11),
               title="parameters (area)", title_fontsize=8, labelspacing=1.3, borderpad=0.9)  # fmt: skip
    save_figure(fig, path)


def _round_sizes(params: pd.Series) -> list[float]:
    """Up to three legend sizes spanning the plotted models: smallest, middle, largest (2 significant digits)."""
    values = sorted({float(p) for p in params if p > 0})
    if not values:
        return []
    picks = {values[0], values[len(values) // 2], values[-1]}
    return [float(f"{p:.2g}") for p in picks]


@dataclass
class Panel:
    """One model's grid: its samples on the shared noise and the caption (stage, sampler, FD)."""

    name: str
    sampler: str
    fd: float
    x: Tensor


def side_by_side(
    panels: Sequence[Panel], labels: Tensor, num_classes: int, path: Path, per_row: int = 8, conditional: bool = True,
    class_names: list[str] | None = None,
) -> None:
    """Every model's grid on the same noise and labels, FD in each title: differences are the models' own."""
    cols = min(per_row, len(panels))
    rows = math.ceil(len(panels) / cols)
    two_d = panels[0].x.dim() == 2
    per_class = max(int((labels == c).sum()) for c in range(num_classes))
    width, height = (3.2, 3.2) if two_d else (max(1.6, per_class * 0.42), max(1.6, num_classes * 0.42))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * width, rows * (height + 0.5)), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        fd = "FD n/a" if math.isnan(panel.fd) else f"FD {panel.fd:.3g}"
        draw_grid(ax, panel.x, labels, num_classes, f"{panel.name}\n{panel.sampler} · {fd}", conditional, class_names)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Every model on the same noise (seed 0), one row per class", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
