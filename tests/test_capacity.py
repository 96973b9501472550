"""Where SlimFlow pays off: both readings of the naive baseline, the capacity sweep's sizes, the verdicts and the
2-step-target diagnostic."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from benchmarks.ablations import net_params
from benchmarks.capacity import FRACTIONS, QUICK_DIVISOR, edits, sizes
from benchmarks.diagnostics import two_step_targets
from benchmarks.quality import verdict
from pipeline.config import AnnealSection, DistillSection, NetSpec
from pipeline.flow import EPS, one_step
from pipeline.slimflow import FlowGuidedDistillationLoss
from stages.distill import recipe

NET = {"kind": "resmlp", "width": 180, "depth": 2, "channels": [32, 64], "emb_dim": 64, "dropout": 0.0}


def _sections() -> tuple[DistillSection, AnnealSection]:
    distill = DistillSection(steps=5000, batch_size=256, lr=0.002, seed=0, warmup_steps=0)
    anneal = AnnealSection(steps=10000, batch_size=256, lr=0.003, seed=0, warmup_steps=200, net=NetSpec(**NET))
    return distill, anneal


def test_the_paper_reading_gets_distillation_s_recipe_and_the_matched_one_the_whole_budget() -> None:
    distill, anneal = _sections()
    paper, matched = recipe("naive-paper", distill, anneal), recipe("naive", distill, anneal)
    assert (paper.steps, paper.lr, paper.warmup_steps) == (5000, 0.002, 0)
    assert (matched.steps, matched.lr, matched.warmup_steps) == (15000, 0.003, 200)
    assert recipe("fgd", distill, anneal) == distill
    assert matched.batch_size == paper.batch_size == 256  # only the budget and its schedule differ


def test_an_unknown_distill_variant_is_one_clear_line(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "stages", "distill", "naive-matched"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown distill variant 'naive-matched'; allowed: fgd, naive-paper, naive" in out.stderr


def test_verdicts_separate_effects_from_noise() -> None:
    assert verdict([-1.0, -1.1, -0.9], sign=-1) == "reproduces"  # lower is better, every seed lower
    assert verdict([1.0, 1.1, 0.9], sign=-1) == "does not"
    assert verdict([-1.0, 1.2, -0.1], sign=-1) == "inside the noise"
    assert verdict([-0.3], sign=-1) == "reproduces (1 seed: noise unknown)"


def test_capacity_sizes_hit_the_fractions_of_the_teacher() -> None:
    teacher = 895_808
    found = sizes({"anneal": {"net": NET}}, (1, 8, 8), 10, teacher)
    assert [f for f, _, _ in found] == list(FRACTIONS)
    for fraction, width, params in found:
        assert params == net_params({**NET, "width": width}, (1, 8, 8), 10)
        assert abs(params / teacher - fraction) < 0.01
    assert [w for _, w, _ in found] == sorted(w for _, w, _ in found)


def test_capacity_quick_divides_every_budget_alike() -> None:
    params = {"anneal": {"net": NET, "steps": 10000, "warmup_steps": 200},
              "distill": {"steps": 5000, "warmup_steps": 0}}  # fmt: skip
    quick, full = edits(params, 64, quick=True), edits(params, 64, quick=False)
    assert full == {"anneal.net": {**NET, "width": 64}}  # full mode: the run's own recipe
    assert quick["anneal.steps"] == 10000 // QUICK_DIVISOR and quick["distill.steps"] == 5000 // QUICK_DIVISOR
    assert quick["anneal.warmup_steps"] == 200 // QUICK_DIVISOR and quick["distill.warmup_steps"] == 0


class Constant(nn.Module):
    """v(x, t) = c: every Euler path is the same straight line, so x_2step(z) = z + (1 - eps) c exactly."""

    def __init__(self, c: Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return self.c.expand_as(x)


@pytest.mark.parametrize("guide_steps", [1, 3])
def test_two_step_targets_of_a_straight_flow_are_its_one_step_samples(guide_steps: int) -> None:
    c = torch.tensor([0.5, -2.0])
    v = Constant(c)
    loss = FlowGuidedDistillationLoss(v, range(3), s_min=0.2, s_max=0.8, guide_steps=guide_steps)
    z, label = torch.randn(2500, 2), torch.randint(3, (2500,))
    targets = two_step_targets(v, loss, z, label)
    assert torch.allclose(targets, z + (1 - EPS) * c, atol=1e-5)
    assert torch.allclose(targets, one_step(v, z, label), atol=1e-5)
