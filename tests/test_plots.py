"""Report pictures: the quality–NFE plot keeps one-step models apart; the side-by-side image has a panel per model."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from pipeline.plots import Panel, _dodged_nfe, quality_vs_nfe, side_by_side

BOARD = pd.DataFrame(
    [("real", "data", 0, 0, 1.9, 0.0), ("teacher", "euler-1", 1, 9000, 118.0, 3.0),
     ("teacher", "dopri5-0.001", 38, 9000, 6.1, 0.3), ("distill@fgd", "onestep", 1, 3000, 7.9, 0.3),
     ("distill@naive", "onestep", 1, 3000, 9.1, 0.3), ("msd@ensemble", "onestep", 1, 6000, 7.2, 0.3)],
    columns=["model", "sampler", "nfe", "params", "fd", "fd_std"],
)  # fmt: skip


def test_models_sharing_an_nfe_are_spread_symmetrically_and_others_stay() -> None:
    rows = BOARD[BOARD["nfe"] > 0]
    x = _dodged_nfe(rows)
    at_one = x[rows["nfe"] == 1]
    assert at_one.nunique() == 4 and math.isclose(math.prod(at_one), 1.0, rel_tol=1e-9)  # symmetric in log
    assert x[rows["sampler"] == "dopri5-0.001"].item() == 38.0


def test_quality_plot_and_side_by_side_are_written(tmp_path: Path) -> None:
    quality_vs_nfe(BOARD, tmp_path / "q.png", floor=1.9)
    labels = torch.arange(3).repeat_interleave(2)
    panels = [Panel(f"m{i}", "onestep", fd, torch.rand(6, 1, 8, 8) * 2 - 1) for i, fd in enumerate([7.9, math.nan])]
    side_by_side(panels, labels, 3, tmp_path / "side.png")
    wide, one = Image.open(tmp_path / "side.png"), Image.open(tmp_path / "q.png")
    assert one.size[0] > one.size[1] and wide.size[0] > wide.size[1]  # two panels in a row
