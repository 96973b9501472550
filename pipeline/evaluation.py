"""Leaderboard rows: one model × sampler measured on fixed noise against the real train / held-out sets.

Every model sees the same noise and the same labels (the held-out labels), seed by seed, so differences
between rows come from the models. Samples are clamped to [-1, 1] before they are measured; the fraction
that overshot is reported (`out_of_range`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.data import Split
from pipeline.featurizer import features, predict
from pipeline.flow import VelocityFn, parse_sampler, sample, straightness
from pipeline.metrics import (
    class_accuracy,
    frechet_distance,
    measure_throughput,
    memorisation,
    out_of_range_fraction,
    precision_recall,
)
from pipeline.runtime import device_of

NOISE_SEED_BASE = 10_000  # evaluation noise never overlaps training or pair seeds
FID_NOISE_SEED = NOISE_SEED_BASE + 1_000  # FID's own sample set, past any eval.seeds count


@dataclass
class Reference:
    """The real data every model is compared with, already featurised."""

    train_x: Tensor  # (N, *shape)
    test_x: Tensor  # (M, *shape)
    train_feats: Tensor  # (N, D)
    test_feats: Tensor  # (M, D)
    test_labels: Tensor  # (M,)
    labels: Tensor  # (n,) labels asked of every model (held-out labels)
    featurizer: nn.Module
    classifies: bool  # False for the identity featurizer (2-D data)
    train_labels: Tensor | None = None  # (N,) for per-group scores


def make_reference(
    train_x: Tensor, test_x: Tensor, test_labels: Tensor, featurizer: nn.Module, n: int,
    train_labels: Tensor | None = None,
) -> Reference:
    labels = test_labels[torch.arange(n) % len(test_labels)]
    return Reference(
        train_x, test_x, features(featurizer, train_x), features(featurizer, test_x), test_labels, labels, featurizer,
        classifies=hasattr(featurizer, "head"), train_labels=train_labels,
    )  # fmt: skip


def eval_inputs(
    split: Split, featurizer: nn.Module, n_samples: int | None, seeds: int
) -> tuple[Reference, list[Tensor]]:
    """The reference and the per-seed noise the `eval` stage scores with; anything compared with its
    leaderboard (the benchmark's ablations) must be scored with exactly these."""
    n = n_samples or len(split.test)
    ref = make_reference(torch.from_numpy(split.train.x), torch.from_numpy(split.test.x),
                         torch.from_numpy(split.test.labels), featurizer, n,
                         train_labels=torch.from_numpy(split.train.labels))  # fmt: skip
    return ref, eval_noise(split.train.shape, n, seeds)


def eval_noise(shape: tuple[int, ...], n: int, seeds: int) -> list[Tensor]:
    """One fixed noise tensor (n, *shape) per evaluation seed, the same for every model."""
    return [
        torch.randn((n, *shape), generator=torch.Generator().manual_seed(NOISE_SEED_BASE + s))
        for s in range(seeds)
    ]


def _solve(
    v: VelocityFn, z: Tensor, labels: Tensor, sampler: str, batch_size: int
) -> tuple[Tensor, list[int]]:
    outputs, nfes, device = [], [], device_of(v)
    for z_chunk, label_chunk in zip(z.split(batch_size), labels.split(batch_size), strict=True):
        result = sample(v, z_chunk.to(device), label_chunk.to(device), sampler)
        outputs.append(result.x.cpu())
        nfes.append(result.nfe)
    return torch.cat(outputs), nfes


def generate(v: VelocityFn, sampler: str, shape: tuple[int, ...], labels: Tensor, batch_size: int) -> Tensor:
    """len(labels) samples from FID's fixed noise: the same for every model, any size (`eval.fid.n_samples`)."""
    z = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(FID_NOISE_SEED))
    return _solve(v, z, labels, sampler, batch_size)[0]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def sample_quality(
    samples: list[Tensor], ref: Reference, knn_k: int, labels: Tensor | None = None
) -> dict[str, float]:
    """FD (train, held-out), precision/recall, class accuracy, memorisation over seeds' sample sets."""
    labels = ref.labels if labels is None else labels
    fd, fd_heldout, prec, rec, acc, mem, over = [], [], [], [], [], [], []
    for raw in samples:
        over.append(out_of_range_fraction(raw))
        x = raw.clamp(-1, 1)
        feats = features(ref.featurizer, x)
        fd.append(frechet_distance(ref.train_feats, feats))
        fd_heldout.append(frechet_distance(ref.test_feats, feats))
        pr = precision_recall(ref.train_feats, feats, k=knn_k)
        prec.append(pr.precision)
        rec.append(pr.recall)
        acc.append(class_accuracy(predict(ref.featurizer, x), labels) if ref.classifies else math.nan)
        mem.append(memorisation(x, ref.train_x, ref.test_x).ratio)
    fd_mean, fd_std = _mean_std(fd)
    heldout_mean, heldout_std = _mean_std(fd_heldout)
    return {
        "fd": fd_mean, "fd_std": fd_std, "fd_heldout": heldout_mean, "fd_heldout_std": heldout_std,
        "precision": float(np.mean(prec)), "recall": float(np.mean(rec)), "class_acc": float(np.mean(acc)),
        "memorisation": float(np.mean(mem)), "out_of_range": float(np.mean(over)),
    }  # fmt: skip


def evaluate_sampler(
    v: nn.Module,
    sampler: str,
    ref: Reference,
    noise: list[Tensor],
    batch_size: int,
    knn_k: int,
    timing_batch: int,
) -> dict[str, float]:
    """Quality over every noise seed, mean NFE per solve, straightness (flows) and throughput at `timing_batch`."""
    samples, nfes = [], []
    for z in noise:
        x, nfe = _solve(v, z, ref.labels, sampler, batch_size)
        samples.append(x)
        nfes.extend(nfe)
    row = {
        "sampler": parse_sampler(sampler).name,
        "nfe": float(np.mean(nfes)),
        **sample_quality(samples, ref, knn_k),
    }
    device = device_of(v)
    z_time, label_time = noise[0][:timing_batch].to(device), ref.labels[:timing_batch].to(device)
    speed = measure_throughput(
        lambda: sample(v, z_time, label_time, sampler), len(z_time), warmup=1, repeats=3
    )
    row["samples_per_s"], row["latency_ms"] = speed.items_per_s, 1000 * speed.latency_s
    return row


def flow_straightness(v: nn.Module, ref: Reference, noise: list[Tensor], n: int = 256) -> float:
    device = device_of(v)
    return straightness(v, noise[0][:n].to(device), ref.labels[:n].to(device))


def real_floor(ref: Reference, knn_k: int) -> dict[str, float]:
    """The held-out set scored as if a model had made it: the floor any model is measured against."""
    row = sample_quality([ref.test_x], ref, knn_k, labels=ref.test_labels)
    row.update({"fd_heldout": math.nan, "fd_heldout_std": math.nan, "sampler": "data", "nfe": 0.0})
    return row


def group_quality(v: nn.Module, ref: Reference, noise: list[Tensor], groups: list[list[int]]) -> list[dict[str, float]]:
    """One-step samples scored per class group (an MSD partition) against the train images of those classes."""
    if ref.train_labels is None:
        raise ValueError("group_quality needs a Reference made with train_labels")
    samples = [_solve(v, z, ref.labels, "onestep", len(z))[0].clamp(-1, 1) for z in noise]
    rows = []
    for k, classes in enumerate(groups):
        wanted = torch.tensor(classes)
        mask, train_mask = torch.isin(ref.labels, wanted), torch.isin(ref.train_labels, wanted)
        fds, accs = [], []
        for x in samples:
            fds.append(frechet_distance(ref.train_feats[train_mask], features(ref.featurizer, x[mask])))
            predicted = predict(ref.featurizer, x[mask]) if ref.classifies else None
            accs.append(math.nan if predicted is None else class_accuracy(predicted, ref.labels[mask]))
        fd, fd_std = _mean_std(fds)
        rows.append({"group": k, "classes": " ".join(map(str, classes)), "fd": fd, "fd_std": fd_std,
                     "class_acc": float(np.mean(accs))})  # fmt: skip
    return rows
