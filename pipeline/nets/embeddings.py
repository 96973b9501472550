"""How (t, label) enter the nets: one conditioning vector per sample, and its per-block FiLM projections."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Sinusoid periods span t-differences from ~1e-3 (the sampler's EPS) up to the whole interval.
_MAX_FREQUENCY = 1000.0
_MIN_FREQUENCY = 0.1


class Conditioning(nn.Module):
    """(t, label) -> (B, emb_dim): sinusoidal features of t through a 2-layer MLP, plus a class embedding."""

    def __init__(self, emb_dim: int, num_classes: int) -> None:
        super().__init__()
        half = emb_dim // 2
        ratio = torch.arange(half, dtype=torch.float64) / max(half - 1, 1)
        freqs = _MAX_FREQUENCY * (_MIN_FREQUENCY / _MAX_FREQUENCY) ** ratio
        # Not persistent: a constant of the architecture, so weight files hold only weights.
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.time = nn.Sequential(nn.Linear(2 * half, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes, emb_dim)

    def forward(self, t: Tensor, label: Tensor) -> Tensor:
        """t: (B,) float in [0,1], label: (B,) long -> (B, emb_dim)."""
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs
        features = torch.cat([angles.sin(), angles.cos()], dim=1)
        return self.time(features) + self.label(label)


class FiLM(nn.Module):
    """Embedding -> one (scale, shift) pair per block, all blocks in one matmul (one GEMM beats many on CPU).

    The scale half of the bias starts at 1, so blocks start near the identity modulation and can use
    `torch.addcmul(shift, h, scale)` without a separate `1 + scale`.
    """

    def __init__(self, emb_dim: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.sizes = [w for w in widths for _ in range(2)]  # scale_0, shift_0, scale_1, shift_1, ...
        self.linear = nn.Linear(emb_dim, sum(self.sizes))
        with torch.no_grad():
            for scale in self.linear.bias.split(self.sizes)[0::2]:
                scale.add_(1.0)

    def forward(self, emb: Tensor) -> list[tuple[Tensor, Tensor]]:
        """emb: (B, emb_dim) -> per block (scale, shift), each (B, width_i)."""
        parts = self.linear(F.silu(emb)).split(self.sizes, dim=1)
        return list(zip(parts[0::2], parts[1::2], strict=True))
