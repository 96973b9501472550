"""The small classifier whose features FD, precision/recall and class accuracy are measured in.

Smooth activations (SiLU) keep every feature alive (a ReLU featurizer left a quarter of them dead).
Flat data (toy2d) use the identity: FD is then the Fréchet distance of the raw points. Unconditional images
have no labels to classify, so they get `RandomFeatures`: the same conv trunk with fixed seeded random
weights, defined without labels or training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.flow import Batch
from pipeline.modelio import BUILDERS
from pipeline.runtime import device_of


class Classifier(nn.Module):
    """Conv trunk for images (C, H, W), MLP trunk for flat data; `features` is the penultimate layer."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(data_shape) == 3:
            self.trunk = _conv_trunk(data_shape, width)
        else:
            flat = int(torch.tensor(data_shape).prod())
            self.trunk = nn.Sequential(
                nn.Flatten(), nn.Linear(flat, 128), nn.SiLU(), nn.Linear(128, width), nn.SiLU()
            )
        self.head = nn.Linear(width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, *shape) -> (B, width)."""
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv_trunk(data_shape: tuple[int, ...], width: int) -> nn.Sequential:
    channels, height, width_px = data_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
        nn.Flatten(), nn.Linear(64 * ((height + 1) // 2) * ((width_px + 1) // 2), width), nn.SiLU(),
    )  # fmt: skip


class RandomFeatures(nn.Module):
    """Featurizer for unconditional images: a conv trunk with fixed random weights (no `head`: no class accuracy).

    Why random and not trained: without labels there is nothing to classify, and a fixed random conv net
    still maps images to features that keep local structure (edges, blobs, colour), so its Fréchet distance
    separates real images from noise or blur (tested) while being reproducible from the seed alone.
    """

    def __init__(self, data_shape: tuple[int, ...], width: int = 64, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.trunk = _conv_trunk(data_shape, width)
        self.trunk.requires_grad_(False)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)


class Identity(nn.Module):
    """Featurizer for 2-D data: features are the points; it predicts no class."""

    def features(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class CrossEntropy:
    """Classification loss in the training loop's `loss(net, batch, step)` form."""

    def __call__(self, net: nn.Module, batch: Batch, step: int = 0) -> Tensor:
        return F.cross_entropy(net(batch.x), batch.label)


@torch.no_grad()
def predict(net: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    device = device_of(net)
    return torch.cat([net(chunk.to(device)).argmax(1).cpu() for chunk in x.split(batch_size)])


@torch.no_grad()
def features(net: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """(N, *shape) on the CPU -> (N, width) on the CPU, computed where the featurizer lives."""
    device = device_of(net)
    return torch.cat([net.features(chunk.to(device)).cpu() for chunk in x.split(batch_size)])


def _build(meta: dict[str, Any]) -> nn.Module:
    if meta.get("identity"):
        return Identity()
    if meta.get("random_features"):
        return RandomFeatures(tuple(meta["data_shape"]), meta["width"], meta.get("seed", 0))
    return Classifier(tuple(meta["data_shape"]), meta["num_classes"], meta["width"])


BUILDERS["featurizer"] = _build
