"""Fully connected velocity nets on flattened data: a plain MLP and a residual MLP."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.nets.embeddings import Conditioning, FiLM
from pipeline.nets.spec import NetSpec


class MLP(nn.Module):
    """Plain MLP: [flat x, emb(t, label)] -> `depth` hidden layers of `width` (SiLU, dropout) -> flat v."""

    def __init__(self, spec: NetSpec, data_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        dim = math.prod(data_shape)
        self.cond = Conditioning(spec.emb_dim, num_classes)
        layers: list[nn.Module] = []
        fan_in = dim + spec.emb_dim
        for _ in range(spec.depth):
            layers += [nn.Linear(fan_in, spec.width), nn.SiLU(), nn.Dropout(spec.dropout)]
            fan_in = spec.width
        layers.append(nn.Linear(fan_in, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """x: (B, *data_shape), t: (B,), label: (B,) -> v: (B, *data_shape)."""
        h = torch.cat([x.flatten(1), self.cond(t, label)], dim=1)
        return self.layers(h).view_as(x)


class ResidualBlock(nn.Module):
    """h + Linear(Dropout(SiLU(Linear(FiLM(LayerNorm(h)))))): pre-norm, conditioned by scale and shift."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.width = width
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """h, scale, shift: (B, width) -> (B, width)."""
        u = torch.addcmul(shift, F.layer_norm(h, (self.width,)), scale)
        return h + self.fc2(self.dropout(F.silu(self.fc1(u))))


class ResMLP(nn.Module):
    """Residual MLP: flat x -> Linear -> `depth` conditioned residual blocks -> LayerNorm -> Linear -> flat v.

    The early measurements in docs/design.md found this the best one-step student per parameter.
    """

    def __init__(self, spec: NetSpec, data_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        dim = math.prod(data_shape)
        self.cond = Conditioning(spec.emb_dim, num_classes)
        self.film = FiLM(spec.emb_dim, [spec.width] * spec.depth)
        self.stem = nn.Linear(dim, spec.width)
        self.blocks = nn.ModuleList(ResidualBlock(spec.width, spec.dropout) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width)
        self.head = nn.Linear(spec.width, dim)

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """x: (B, *data_shape), t: (B,), label: (B,) -> v: (B, *data_shape)."""
        h = self.stem(x.flatten(1))
        for block, (scale, shift) in zip(self.blocks, self.film(self.cond(t, label)), strict=True):
            h = block(h, scale, shift)
        return self.head(self.norm(h)).view_as(x)
