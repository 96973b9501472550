"""Equal-size class partitions for Multi-Student Distillation (docs/methods.md §5).

Each student serves one group; the paper's default is consecutive ids (semantically coherent), k-means on
class means an option, random the worse control.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

PartitionMethod = Literal["consecutive", "kmeans", "random"]
PARTITION_METHODS: tuple[str, ...] = ("consecutive", "kmeans", "random")


def _sizes(num_classes: int, k: int) -> list[int]:
    """K group sizes that differ by at most one, the larger ones first."""
    small, extra = divmod(num_classes, k)
    return [small + 1] * extra + [small] * (k - extra)


def _balanced_assign(dist: Tensor) -> Tensor:
    """Greedy equal-size assignment: closest (class, centre) pairs first, capacities from `_sizes`.

    dist: (C, K) -> (C,) centre index. At most C mod K centres may take one class beyond C // K.
    """
    n, k = dist.shape
    small, extra = divmod(n, k)
    count, assign = [0] * k, [-1] * n
    for flat in torch.argsort(dist.flatten(), stable=True).tolist():
        i, j = divmod(flat, k)
        if assign[i] < 0 and (count[j] < small or (count[j] == small and extra > 0)):
            extra -= count[j] == small
            count[j] += 1
            assign[i] = j
    return torch.tensor(assign)


def _balanced_kmeans(means: Tensor, k: int, generator: torch.Generator, iters: int = 100) -> list[list[int]]:
    """Lloyd iterations with the equal-size assignment; farthest-point start from a seeded first centre."""
    means = means.detach().cpu().double().flatten(1)
    chosen = [int(torch.randint(len(means), (1,), generator=generator))]
    for _ in range(k - 1):
        chosen.append(int(torch.cdist(means, means[chosen]).min(1).values.argmax()))
    centres, assign = means[chosen], None
    for _ in range(iters):
        new = _balanced_assign(torch.cdist(means, centres))
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack([means[assign == j].mean(0) for j in range(k)])
    return [torch.nonzero(assign == j).flatten().tolist() for j in range(k)]


def partition_classes(
    num_classes: int,
    k: int,
    method: PartitionMethod = "consecutive",
    class_means: Tensor | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """K disjoint groups covering classes 0..num_classes-1 once each, sizes differing by at most one.

    consecutive: contiguous id ranges (the paper's semantically coherent default). kmeans: equal-size
    k-means on `class_means` (num_classes, *feature_shape), e.g. per-class mean images. random: a seeded
    permutation (the paper's worse control). Deterministic for a seed; each group sorted, groups ordered
    by their smallest class.
    """
    if not 1 <= k <= num_classes:
        raise ValueError(f"need 1 <= k <= num_classes, got k={k}, num_classes={num_classes}")
    generator = torch.Generator().manual_seed(seed)
    sizes = _sizes(num_classes, k)
    if method == "consecutive":
        groups = list(torch.arange(num_classes).split(sizes))
    elif method == "random":
        groups = list(torch.randperm(num_classes, generator=generator).split(sizes))
    elif method == "kmeans":
        if class_means is None or class_means.shape[0] != num_classes:
            got = None if class_means is None else tuple(class_means.shape)
            raise ValueError(f"kmeans needs class_means with {num_classes} rows, got {got}")
        groups = [torch.tensor(g) for g in _balanced_kmeans(class_means, k, generator)]
    else:
        raise ValueError(f"unknown partition method {method!r}; allowed: {', '.join(PARTITION_METHODS)}")
    return sorted((sorted(g.tolist()) for g in groups), key=lambda g: g[0])


def check_partition(groups: Sequence[Sequence[int]], num_classes: int) -> None:
    """ValueError unless `groups` are non-empty and cover 0..num_classes-1 exactly once."""
    flat = sorted(c for g in groups for c in g)
    if any(len(g) == 0 for g in groups) or flat != list(range(num_classes)):
        raise ValueError(f"groups must be non-empty and cover classes 0..{num_classes - 1} once: {groups}")
