"""FID/KID maths against direct computations, and the whole FID path with a scripted stand-in Inception."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.fid import FidError, make_scorer, to_uint8_rgb
from pipeline.metrics import frechet_distance, frechet_distance_from_stats, gaussian_stats, kernel_inception_distance


def _gaussian(rng: np.random.Generator, n: int, dim: int, shift: float) -> np.ndarray:
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mixing + shift


def test_frechet_distance_matches_scipy_sqrtm_on_random_gaussians() -> None:
    rng = np.random.default_rng(0)
    for dim, shift in [(3, 0.0), (8, 0.5), (20, 2.0)]:
        a, b = _gaussian(rng, 400, dim, 0.0), _gaussian(rng, 300, dim, shift)
        mu_a, mu_b = a.mean(0), b.mean(0)
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
        direct = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross)
        assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-8, abs=1e-10)
        assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(direct, rel=1e-8, abs=1e-10)


def test_gaussian_stats_are_the_sample_mean_and_covariance() -> None:
    x = np.random.default_rng(1).standard_normal((50, 4))
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


def test_kid_is_the_unbiased_polynomial_mmd_when_one_subset_holds_everything() -> None:
    rng = np.random.default_rng(2)
    x, y = _gaussian(rng, 40, 5, 0.0), _gaussian(rng, 40, 5, 1.0)
    k = lambda p, q: (p @ q.T / 5 + 1) ** 3  # noqa: E731
    m = len(x)
    within = (k(x, x).sum() - np.trace(k(x, x)) + k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1))
    direct = within - 2 * k(x, y).mean()
    assert kernel_inception_distance(x, y, subsets=3, subset_size=40) == pytest.approx(direct, rel=1e-10)
    same = kernel_inception_distance(x[:20], x[20:], subsets=10, subset_size=20)
    assert abs(same) < 0.2 * direct


def test_to_uint8_rgb_rounds_clamps_and_repeats_grayscale() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 5)
    out = to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 5)
    assert out[0, 0, 0].tolist() == [0, 0, 128, 255, 255] and torch.equal(out[:, 0], out[:, 2])
    with pytest.raises(FidError, match="1 or 3"):
        to_uint8_rgb(torch.zeros(2, 4))


class StandIn(torch.nn.Module):
    """The TorchScript Inception's call: uint8 NCHW RGB -> (N, D) features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(48, 64)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return self.lin(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1))


@pytest.fixture(scope="module")
def inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fid") / "inception.pt"
    torch.jit.save(torch.jit.script(StandIn()), str(path))
    return path


def _images(n: int, channels: int, seed: int) -> torch.Tensor:
    """Smooth random images: a few coloured blobs on black, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand((n, channels, 4, 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(base, size=16, mode="bilinear")


def test_fid_path_ranks_real_below_altered_images_and_records_its_protocol(inception: Path) -> None:
    train, held_out = _images(300, 1, 0), _images(300, 1, 1)
    scorer = make_scorer(str(inception), "train", 300, train)
    real, brighter = scorer.score(held_out), scorer.score((held_out + 0.5).clamp(-1, 1))
    assert real["fid"] < 0.2 * brighter["fid"] and real["kid"] < 0.2 * brighter["kid"]
    assert scorer.score(torch.rand(300, 1, 16, 16) * 2 - 1)["fid"] > 5 * real["fid"]
    assert scorer.score(train)["fid"] == pytest.approx(0.0, abs=1e-9)
    protocol = scorer.protocol
    assert protocol["features"] == 64 and protocol["n_samples"] == 300 and "train set (300" in protocol["reference"]
    assert len(protocol["inception_sha256"]) == 64 and "grayscale repeated" in protocol["conversion"]


def test_an_npz_reference_gives_the_train_reference_fid_without_kid(inception: Path, tmp_path: Path) -> None:
    train, samples = _images(200, 3, 2), _images(100, 3, 3)
    from_train = make_scorer(str(inception), "train", 100, train)
    np.savez(tmp_path / "ref.npz", mu=from_train.mu, sigma=from_train.sigma)
    from_file = make_scorer(str(inception), str(tmp_path / "ref.npz"), 100, train)
    scores = from_file.score(samples)
    assert scores["fid"] == pytest.approx(from_train.score(samples)["fid"], rel=1e-9)
    assert np.isnan(scores["kid"]) and "sha256" in from_file.protocol["reference"]


def test_bad_fid_inputs_are_one_clear_line(inception: Path, tmp_path: Path) -> None:
    train = _images(10, 3, 4)
    (tmp_path / "not.pt").write_bytes(b"not torchscript")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(64))
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    cases = [(str(tmp_path / "missing.pt"), "train", "no such file"),
             (str(tmp_path / "not.pt"), "train", "not a TorchScript file"),
             (str(inception), str(tmp_path / "bad.npz"), "needs arrays mu and sigma"),
             (str(inception), str(tmp_path / "small.npz"), "do not match the network's 64 features")]  # fmt: skip
    for net, reference, message in cases:
        with pytest.raises(FidError, match=message) as caught:
            make_scorer(net, reference, 10, train)
        assert "\n" not in str(caught.value)
