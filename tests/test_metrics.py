"""Exact-answer tests for pipeline.metrics."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from pipeline import metrics


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians(gen):
    mu_a, mu_b = torch.zeros(4), torch.tensor([1.0, 0.0, -0.5, 0.0])
    var_a, var_b = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([2.0, 1.0, 1.0, 0.25])
    exact = (mu_a - mu_b).square().sum() + (var_a + var_b - 2 * (var_a * var_b).sqrt()).sum()
    n = 200_000
    a = mu_a + var_a.sqrt() * torch.randn(n, 4, generator=gen)
    b = mu_b + var_b.sqrt() * torch.randn(n, 4, generator=gen)
    assert metrics.frechet_distance(a, b) == pytest.approx(exact.item(), abs=0.03)


def test_frechet_distance_of_a_set_with_itself_is_zero(gen):
    a = torch.randn(500, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_agrees_with_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * cross)
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_tolerates_dead_units(gen):
    a, b = torch.randn(300, 6, generator=gen), torch.randn(300, 6, generator=gen)
    a[:, 2] = b[:, 2] = 0.0
    assert math.isfinite(metrics.frechet_distance(a, b))


def test_precision_recall_identical_sets_is_one(gen):
    x = torch.randn(300, 5, generator=gen)
    assert metrics.precision_recall(x, x.clone()) == metrics.PrecisionRecall(precision=1.0, recall=1.0)


def test_precision_recall_far_apart_sets_is_zero(gen):
    real = torch.randn(200, 5, generator=gen)
    fake = torch.randn(200, 5, generator=gen) + 100.0
    assert metrics.precision_recall(real, fake) == metrics.PrecisionRecall(precision=0.0, recall=0.0)


def test_precision_recall_half_overlap_is_one_half(gen):
    # real covers clusters A and B, fake covers B (the same points) and C: each sees half of the other.
    cluster_a, cluster_b, cluster_c = (0.1 * torch.randn(50, 3, generator=gen) + off for off in (0, 50, -50))
    real, fake = torch.cat([cluster_a, cluster_b]), torch.cat([cluster_b, cluster_c])
    result = metrics.precision_recall(real, fake, k=3, chunk=7)  # chunk not dividing N exercises the blocks
    assert result == metrics.PrecisionRecall(precision=0.5, recall=0.5)


def test_precision_recall_rejects_k_not_below_set_size(gen):
    with pytest.raises(ValueError, match="k must be"):
        metrics.precision_recall(torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen), k=3)


def test_memorisation_copies_of_train_give_ratio_zero(gen):
    train, heldout = torch.randn(400, 1, 8, 8, generator=gen), torch.randn(200, 1, 8, 8, generator=gen)
    result = metrics.memorisation(train[:200].clone(), train, heldout, chunk=64)
    assert result.sample_nn == 0.0 and result.ratio == 0.0
    assert result.heldout_nn > 0


def test_memorisation_fresh_draws_give_ratio_near_one(gen):
    train, heldout, samples = (torch.randn(n, 1, 8, 8, generator=gen) for n in (400, 300, 300))
    assert metrics.memorisation(samples, train, heldout).ratio == pytest.approx(1.0, abs=0.05)


def test_out_of_range_fraction_counts_strictly_beyond_bound():
    x = torch.tensor([[0.0, 1.0, 1.04, 1.06], [-1.1, -0.5, 2.0, 0.3]])
    assert metrics.out_of_range_fraction(x) == pytest.approx(3 / 8)
    assert metrics.out_of_range_fraction(x, bound=1.5) == pytest.approx(1 / 8)


def test_feature_health_counts_dead_units_and_rank(gen):
    feats = torch.randn(200, 10, generator=gen)
    feats[:, [2, 5]] = 0.0  # ReLU units that never fire
    feats[:, 7] = 3.0  # constant but non-zero: dead too
    feats[:, 9] = 2 * feats[:, 0]  # alive but redundant: lowers the rank only
    assert metrics.feature_health(feats) == metrics.FeatureHealth(rank=6, dead_units=3)


def test_wasserstein2_of_a_translate_is_the_shift_norm(gen):
    a = torch.randn(100, 2, generator=gen)
    c = torch.tensor([3.0, -4.0])
    assert metrics.wasserstein2(a, a + c) == pytest.approx(5.0, rel=1e-6)
    assert metrics.wasserstein2(a, a) == pytest.approx(0.0, abs=1e-9)


def test_wasserstein2_between_unequal_sizes_uses_uniform_weights():
    # One point at 0 vs two points at +-1: every unit of mass travels distance 1.
    assert metrics.wasserstein2(np.zeros((1, 1)), np.array([[1.0], [-1.0]])) == pytest.approx(1.0)


def test_energy_distance_zero_for_identical_positive_otherwise(gen):
    a = torch.randn(150, 3, generator=gen)
    assert metrics.energy_distance(a, a.clone(), chunk=16) == 0.0
    assert metrics.energy_distance(a, a + 0.5) > 0.0


def test_energy_distance_matches_scipy_in_one_dimension():
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=(120, 1)), rng.normal(0.7, 1.3, size=(90, 1))
    ref = scipy.stats.energy_distance(u[:, 0], v[:, 0]) ** 2
    assert metrics.energy_distance(u, v, chunk=25) == pytest.approx(ref, rel=1e-9)


def test_mode_coverage_is_exact_on_constructed_case(gen):
    angles = torch.arange(8) * (2 * math.pi / 8)
    centers = 5.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    near = centers[:5].repeat(10, 1) + 0.05 * torch.randn(50, 2, generator=gen)  # modes 0..4 hit
    between = (centers[5] + centers[6]) / 2  # ~1.9 from either centre: too far to count
    samples = torch.cat([near, between[None]])
    assert metrics.mode_coverage(samples, centers, radius=0.5) == 5 / 8


def test_class_accuracy_from_logits_and_from_predictions():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.5], [0.0, 3.0, 0.0]])
    assert metrics.class_accuracy(logits, labels) == 0.75
    assert metrics.class_accuracy(np.array([0, 1, 1, 1]), labels) == 0.75
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.class_accuracy(labels[:3], labels)


def test_measure_throughput_returns_positive_consistent_numbers():
    calls = []
    x = torch.randn(64, 64)

    def fn() -> None:
        calls.append(1)
        x @ x

    result = metrics.measure_throughput(fn, n_items=64, warmup=2, repeats=3)
    assert len(calls) == 5
    assert result.latency_s > 0 and result.items_per_s > 0
    assert result.items_per_s == pytest.approx(64 / result.latency_s)
