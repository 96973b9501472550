"""Where SlimFlow pays off: both readings of the naive baseline, the capacity sweep's sizes, the verdicts and the
2-step-target diagnostic."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from benchmarks.ablations import net_params
from benchmarks.capacity import FRACTIONS, QUICK_DIVISOR, REUSE_TOLERANCE, edits, fgd_versus_naive, seed_means, sizes
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


def test_capacity_sizes_hit_the_fractions_of_the_teacher_and_reuse_the_run_s_own_student() -> None:
    teacher = 895_808
    own = net_params(NET, (1, 8, 8), 10)
    found = sizes({"anneal": {"net": NET}}, (1, 8, 8), 10, teacher)
    assert [f for f, _, _ in found] == list(FRACTIONS)
    for fraction, width, params in found:
        assert params == net_params({**NET, "width": width}, (1, 8, 8), 10)
        if width == NET["width"]:  # the run's own student stands for the size it is close to
            assert abs(own - fraction * teacher) <= REUSE_TOLERANCE * fraction * teacher
        else:
            assert abs(params / teacher - fraction) < 0.01
    assert [w for f, w, _ in found if f == 0.25] == [NET["width"]]
    assert [w for _, w, _ in found] == sorted(w for _, w, _ in found)


def test_a_run_whose_student_is_far_from_every_size_reuses_nothing() -> None:
    far = {**NET, "width": 400}  # ~0.9 M parameters: the teacher's size, no fraction near it
    assert NET["width"] not in [w for _, w, _ in sizes({"anneal": {"net": far}}, (1, 8, 8), 10, 895_808)]
    assert 400 not in [w for _, w, _ in sizes({"anneal": {"net": far}}, (1, 8, 8), 10, 895_808)]


def _rows(fds: dict[tuple[str, float, str], float]) -> list[dict]:
    return [{"run": run, "fraction": f, "width": int(f * 1000), "params": int(f * 10_000), "params_ratio": f,
             "model": model, "fd": fd} for (run, f, model), fd in fds.items()]  # fmt: skip


def test_capacity_means_and_verdicts_are_over_the_runs_at_each_size() -> None:
    fds = {}
    for run, shift in (("s0", 0.0), ("s1", 1.0), ("s2", 2.0)):
        fds |= {(run, 0.05, "distill@fgd"): 10.0 + shift, (run, 0.05, "distill@naive"): 12.0 + shift,
                (run, 0.05, "distill@naive-paper"): 9.0 + 2 * shift,
                (run, 0.5, "distill@fgd"): 5.0, (run, 0.5, "distill@naive"): 4.0 + shift / 10}  # fmt: skip
    means = {(r["fraction"], r["model"]): r for r in seed_means(_rows(fds))}
    assert means[(0.05, "distill@fgd")]["fd_mean"] == pytest.approx(11.0)
    assert means[(0.05, "distill@fgd")]["fd_std"] == pytest.approx(1.0)
    assert means[(0.05, "distill@fgd")]["seeds"] == 3
    assert means[(0.05, "distill@naive-paper")]["per_seed"] == "9; 11; 13"
    versus = {(c["fraction"], c["baseline"]): c for c in fgd_versus_naive(_rows(fds))}
    assert versus[(0.05, "distill@naive")]["fgd_minus_baseline"] == pytest.approx(-2.0)
    assert versus[(0.05, "distill@naive")]["std"] == pytest.approx(0.0)
    assert versus[(0.05, "distill@naive")]["verdict"] == "reproduces"  # FGD lower in every seed
    assert versus[(0.05, "distill@naive-paper")]["fgd_better"] == "1/3"  # +1, 0, -1
    assert versus[(0.05, "distill@naive-paper")]["verdict"] == "inside the noise"
    assert versus[(0.5, "distill@naive")]["verdict"] == "does not"  # FGD higher by 1.0, 0.9, 0.8
    assert (0.5, "distill@naive-paper") not in versus  # a baseline a size lacks is not compared


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
