"""Sample-quality, memorisation and speed metrics (docs/methods.md §7).

Pure functions on tensors or arrays: no file I/O, no training, no config. Everything is computed in
float64 so that exact-answer tests (and comparisons between models a few per cent apart) are not limited by
float32 rounding. Pairwise distances are taken block by block (`chunk` query rows at a time), so memory
stays at `chunk x N` whatever the set sizes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

Array = Tensor | np.ndarray
CHUNK: int = 1024  # query rows per pairwise-distance block


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float  # fraction of fake samples inside the real k-NN manifold (fidelity)
    recall: float  # fraction of real samples inside the fake k-NN manifold (coverage)


@dataclass(frozen=True)
class Memorisation:
    sample_nn: float  # mean distance from a generated sample to its nearest train image
    heldout_nn: float  # mean distance from a held-out real image to its nearest train image
    ratio: float  # sample_nn / heldout_nn; < 1 means samples sit closer to train than unseen real data does


@dataclass(frozen=True)
class FeatureHealth:
    rank: int  # numerical rank of the centred feature matrix
    dead_units: int  # feature dimensions with (near) zero variance, e.g. ReLU units that never fire


@dataclass(frozen=True)
class Throughput:
    latency_s: float  # median wall time of one call
    items_per_s: float  # n_items / latency_s


def _rows(x: Array) -> Tensor:
    """(N, *shape) array or tensor -> (N, D) float64 tensor on its own device (numpy goes to the CPU)."""
    t = torch.as_tensor(x).detach()
    return t.reshape(t.shape[0], -1).to(torch.float64)


def _cdist(a: Tensor, b: Tensor) -> Tensor:
    # The matmul shortcut of torch.cdist leaves ~1e-7 residues between identical points; exact mode keeps
    # "distance to a copy is 0", which the memorisation and k-NN manifold tests rely on.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _nn_distance(query: Tensor, ref: Tensor, chunk: int) -> Tensor:
    """(Nq, D), (Nr, D) -> (Nq,) Euclidean distance from each query row to its nearest ref row."""
    return torch.cat([_cdist(q, ref).amin(dim=1) for q in query.split(chunk)])


def _mean_distance(a: Tensor, b: Tensor, chunk: int) -> float:
    """Mean of ||a_i - b_j|| over all (i, j) pairs, diagonal included."""
    total = sum(_cdist(q, b).sum().item() for q in a.split(chunk))
    return total / (a.shape[0] * b.shape[0])


def _manifold_coverage(ref: Tensor, query: Tensor, k: int, chunk: int) -> float:
    """Fraction of query rows inside the union of balls around each ref row reaching its k-th neighbour."""
    if not 1 <= k < ref.shape[0]:
        raise ValueError(f"k must be in [1, {ref.shape[0] - 1}] for {ref.shape[0]} reference points, got {k}")
    # Index k of the sorted row is the k-th neighbour because index 0 is the point itself (distance 0).
    radii = torch.cat([_cdist(r, ref).kthvalue(k + 1, dim=1).values for r in ref.split(chunk)])
    inside = torch.cat([(_cdist(q, ref) <= radii).any(dim=1) for q in query.split(chunk)])
    return inside.to(torch.float64).mean().item()


def gaussian_stats(feats: Array) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of a feature set (N, D), float64: what FID reference files store."""
    a = _rows(feats).cpu()
    return a.mean(0).numpy(), torch.cov(a.T).reshape(a.shape[1], -1).numpy()


def frechet_distance_from_stats(mu_a: Array, cov_a: Array, mu_b: Array, cov_b: Array) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}). The cross term uses the symmetric form
    tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}), whose eigenvalues are real and >= 0, so no complex sqrtm is needed
    and near-singular covariances (dead feature units) stay stable.
    """
    ma, mb = (torch.as_tensor(m, dtype=torch.float64).cpu().reshape(-1) for m in (mu_a, mu_b))
    sa, sb = (torch.as_tensor(c, dtype=torch.float64).cpu() for c in (cov_a, cov_b))
    if ma.shape != mb.shape or sa.shape != (len(ma), len(ma)) or sb.shape != sa.shape:
        raise ValueError(f"feature sizes differ: mu {tuple(ma.shape)} / {tuple(mb.shape)}, "
                         f"sigma {tuple(sa.shape)} / {tuple(sb.shape)}")  # fmt: skip
    w, q = torch.linalg.eigh(sa)
    sqrt_a = (q * w.clamp_min(0).sqrt()) @ q.T
    m = sqrt_a @ sb @ sqrt_a
    tr_cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (ma - mb).square().sum() + sa.trace() + sb.trace() - 2 * tr_cross
    return max(fd.item(), 0.0)  # rounding can leave ~-1e-12 for identical sets


def frechet_distance(feats_a: Array, feats_b: Array) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets feats_a: (Na, D), feats_b: (Nb, D), N >= 2."""
    a, b = _rows(feats_a), _rows(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def kernel_inception_distance(
    feats_a: Array, feats_b: Array, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / D + 1)^3, averaged over random subsets.

    feats_a: (Na, D), feats_b: (Nb, D); each subset draws min(subset_size, Na, Nb) rows of each set without
    replacement, as StyleGAN2-ADA's and clean-fid's KID do.
    """
    a, b = _rows(feats_a).cpu(), _rows(feats_b).cpu()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    m, dim = min(subset_size, len(a), len(b)), a.shape[1]
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows in each set, got {len(a)} and {len(b)}")
    generator, total = torch.Generator().manual_seed(seed), 0.0
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m]]
        y = b[torch.randperm(len(b), generator=generator)[:m]]
        kxx, kyy, kxy = ((p @ q.T / dim + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        total += (within - 2 * kxy.mean()).item()
    return total / subsets


def precision_recall(real: Array, fake: Array, k: int = 3, *, chunk: int = CHUNK) -> PrecisionRecall:
    """k-NN manifold precision and recall (Kynkäänniemi et al. 2019) in feature space.

    real: (Nr, D), fake: (Nf, D). A set's manifold is the union of balls around its points, each reaching that
    point's k-th nearest neighbour within the same set. Precision = fraction of fake points in the real
    manifold; recall = fraction of real points in the fake manifold.
    """
    r, f = _rows(real), _rows(fake)
    return PrecisionRecall(
        precision=_manifold_coverage(r, f, k, chunk), recall=_manifold_coverage(f, r, k, chunk)
    )


def memorisation(samples: Array, train: Array, heldout: Array, *, chunk: int = CHUNK) -> Memorisation:
    """Nearest-train-neighbour distance of samples vs that of held-out real images, in raw pixel space.

    samples: (Ns, *shape), train: (Nt, *shape), heldout: (Nh, *shape); images are flattened.
    FD against the train set rewards copying it; a ratio well below 1 flags that (docs/methods.md §7).
    """
    ref = _rows(train)
    sample_nn = _nn_distance(_rows(samples).to(ref.device), ref, chunk).mean().item()
    heldout_nn = _nn_distance(_rows(heldout).to(ref.device), ref, chunk).mean().item()
    ratio = sample_nn / heldout_nn if heldout_nn > 0 else float("nan")
    return Memorisation(sample_nn=sample_nn, heldout_nn=heldout_nn, ratio=ratio)


def out_of_range_fraction(x: Array, bound: float = 1.05) -> float:
    """Fraction of elements of x (any shape) with |x| > bound: one-step students overshoot [-1, 1]."""
    t = torch.as_tensor(x)
    return (t.abs() > bound).to(torch.float64).mean().item()


def feature_health(feats: Array, dead_tol: float = 1e-6) -> FeatureHealth:
    """Numerical rank and dead units of a featurizer's outputs.

    feats: (N, D). A unit is dead when its standard deviation over the N rows is <= dead_tol; the rank is that
    of the centred matrix (torch.linalg.matrix_rank's default tolerance), i.e. the directions FD can see.
    """
    f = _rows(feats)
    dead = int((f.std(dim=0) <= dead_tol).sum().item())
    rank = int(torch.linalg.matrix_rank(f - f.mean(dim=0)).item())
    return FeatureHealth(rank=rank, dead_units=dead)


def wasserstein2(a: Array, b: Array) -> float:
    """Exact optimal-transport W2 between two uniformly weighted point sets (POT network simplex).

    a: (Na, D), b: (Nb, D); the sets may differ in size. Cost is O(N^3): meant for toy2d-sized sets.
    """
    xa, xb = _rows(a).cpu().numpy(), _rows(b).cpu().numpy()
    import ot  # POT pulls in scipy.optimize (~3 s): only the 2-D metrics pay for it

    cost = ot.dist(xa, xb, metric="sqeuclidean")
    w2_sq = ot.emd2(ot.unif(len(xa)), ot.unif(len(xb)), cost, numItermax=10_000_000)
    return float(np.sqrt(max(float(w2_sq), 0.0)))


def energy_distance(a: Array, b: Array, *, chunk: int = CHUNK) -> float:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| between the empirical distributions.

    a: (Na, D), b: (Nb, D). V-statistic (self-pairs included), so it is exactly 0 for identical sets and > 0
    for different ones; in 1-D it equals scipy.stats.energy_distance squared.
    """
    xa, xb = _rows(a), _rows(b)
    xb = xb.to(xa.device)
    cross = _mean_distance(xa, xb, chunk)
    return max(2 * cross - _mean_distance(xa, xa, chunk) - _mean_distance(xb, xb, chunk), 0.0)


def mode_coverage(samples: Array, centers: Array, radius: float, *, chunk: int = CHUNK) -> float:
    """Fraction of mixture centres with at least one sample within radius (inclusive).

    samples: (N, D), centers: (K, D).
    """
    s, c = _rows(samples), _rows(centers)
    return (_nn_distance(c.to(s.device), s, chunk) <= radius).to(torch.float64).mean().item()


def class_accuracy(logits_or_pred: Array, labels: Array) -> float:
    """Fraction of predictions equal to labels.

    logits_or_pred: (N, C) logits (argmax taken) or (N,) predicted classes; labels: (N,).
    """
    out, y = torch.as_tensor(logits_or_pred), torch.as_tensor(labels)
    pred = out.argmax(dim=-1) if out.ndim == 2 else out
    if pred.shape != y.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(y.shape)} differ in shape")
    return (pred.to(y.device) == y).to(torch.float64).mean().item()


def _sync() -> None:
    # CUDA kernels run asynchronously; without a sync the clock stops before the work is done.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_throughput(fn: Callable[[], Any], n_items: int, warmup: int = 1, repeats: int = 5) -> Throughput:
    """Median wall time of fn() over `repeats` timed calls after `warmup` untimed ones.

    n_items: items (e.g. samples) one call produces; items_per_s = n_items / median latency.
    """
    if repeats < 1 or n_items < 1:
        raise ValueError(f"repeats and n_items must be >= 1, got {repeats} and {n_items}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    return Throughput(latency_s=latency, items_per_s=n_items / latency)
