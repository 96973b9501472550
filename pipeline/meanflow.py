"""MeanFlow (docs/methods.md §9): a one-step generator trained from scratch on data, no teacher, no pairs.

Everything here is in slimstep's time (noise at 0, data at 1, x_s = s x + (1 - s) z, v = x - z). The net
learns the average velocity from a (noisier) to b >= a along the flow, ū(x_a, a, b) = 1/(b - a) ∫_a^b v ds,
so x_b = x_a + (b - a) ū. Differentiating (b - a) ū = ∫_a^b v in a along the flow gives the identity

    ū(x_a, a, b) = v(x_a, a) + (b - a) dū/da,   dū/da = v · ∂_x ū + ∂_a ū   (a JVP along (v, 1, 0)).

The paper (Geng et al. 2025) puts data at 0 and noise at 1: its u(z_t, r, t) with r <= t is -ū(x_a, a, b)
with a = 1 - t, b = 1 - r; its (r, t) sampling is drawn in its convention and converted here. One step is
x = z + ū(z, 0, 1) — the paper's x = z - u(z, 0, 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.flow import Batch, expand_time, interpolate
from pipeline.modelio import BUILDERS
from pipeline.nets import NetSpec, build_net
from pipeline.nets.embeddings import Conditioning


class TwoTimeConditioning(nn.Module):
    """(times (B, 2) = [a, b - a], label) -> the backbone's embedding of (a, label) plus an embedding of b - a."""

    def __init__(self, base: nn.Module, emb_dim: int) -> None:
        super().__init__()
        self.base = base
        self.gap = Conditioning(emb_dim, num_classes=1)  # its single label adds a learned constant

    def forward(self, times: Tensor, label: Tensor) -> Tensor:
        return self.base(times[:, 0], label) + self.gap(times[:, 1], torch.zeros_like(label))


class MeanFlowNet(nn.Module):
    """Average-velocity net ū(x, a, label, b) on any slimstep backbone (its conditioning gets a second time).

    Called as a velocity model v(x, t, label) it returns ū(x, t, 1), the average velocity from t to data,
    so slimstep's one-step sampler z + (1 - eps) v(z, eps) is exactly MeanFlow's one-step map from eps.
    """

    def __init__(self, spec: NetSpec, data_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.backbone = build_net(spec, data_shape, num_classes)
        self.backbone.cond = TwoTimeConditioning(self.backbone.cond, spec.emb_dim)

    def forward(self, x: Tensor, a: Tensor, label: Tensor, b: Tensor | None = None) -> Tensor:
        """x (B, *shape), a (B,), label (B,), b (B,) >= a (default 1: to data) -> ū (B, *shape)."""
        b = torch.ones_like(a) if b is None else b
        return self.backbone(x, torch.stack([a, b - a], dim=1), label)


def _build(meta: dict[str, Any]) -> nn.Module:
    return MeanFlowNet(NetSpec.model_validate(meta["net"]), tuple(meta["data_shape"]), meta["num_classes"])


BUILDERS["meanflow"] = _build


def sample_times(
    n: int, flow_fraction: float, mean: float, std: float, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """(a, b), each (n,), a <= b: the paper's (r, t) sampling converted to slimstep time.

    In the paper's time two logit-normal(mean, std) draws are sorted into r <= t; a `flow_fraction` of the
    samples get r = t (plain flow matching). Then a = 1 - t, b = 1 - r.
    """
    times = torch.sigmoid(mean + std * torch.randn(2, n, device=device))
    r, t = times.min(0).values, times.max(0).values
    r = torch.where(torch.rand(n, device=device) < flow_fraction, t, r)
    return 1 - t, 1 - r


def average_velocity_and_target(
    net: nn.Module, x_a: Tensor, a: Tensor, b: Tensor, v: Tensor, label: Tensor
) -> tuple[Tensor, Tensor]:
    """(ū_θ(x_a, a, b), sg(v + (b - a) dū_θ/da)): the net's output (with grad) and its identity target.

    `v` is the velocity at (x_a, a): the conditional x - z in training, an exact one in tests. The target is
    v wherever b = a (the flow-matching share of the batch), and it is never differentiated, so the JVP runs
    only on the rows with b > a and without autograd: a step costs one flow-matching step plus a forward-mode
    pass over that share (same values; with dropout the two calls draw their own masks).
    """
    u = net(x_a, a, label, b)
    target = v.detach().clone()
    moving = (b > a).nonzero().squeeze(1)
    if moving.numel():
        own_label = label[moving]

        def average(x: Tensor, start: Tensor, end: Tensor) -> Tensor:
            return net(x, start, own_label, end)

        start, end, velocity = a[moving], b[moving], v[moving].detach()
        with torch.no_grad():
            _, du_da = torch.func.jvp(average, (x_a[moving].detach(), start, end),
                                      (velocity, torch.ones_like(start), torch.zeros_like(end)))  # fmt: skip
        target[moving] = velocity + expand_time(end - start, du_da) * du_da
    return u, target


class MeanFlowLoss:
    """sg(w) · mean((ū_θ - target)^2) per sample, w = 1 / (that + c)^p (the paper's adaptive weight; p = 0 is MSE)."""

    def __init__(self, flow_fraction: float, time_mean: float, time_std: float, power: float, c: float) -> None:
        if not 0.0 <= flow_fraction <= 1.0 or time_std <= 0 or power < 0 or c <= 0:
            raise ValueError(
                f"need 0 <= flow_fraction <= 1, time_std > 0, power >= 0, c > 0; got {flow_fraction}, "
                f"{time_std}, {power}, {c}"
            )
        self.flow_fraction, self.time_mean, self.time_std = flow_fraction, time_mean, time_std
        self.power, self.c = power, c
        self.last_metrics: dict[str, Tensor] = {}

    def __call__(self, net: nn.Module, batch: Batch, step: int = 0) -> Tensor:
        x = batch.x
        z = torch.randn_like(x)
        a, b = sample_times(x.shape[0], self.flow_fraction, self.time_mean, self.time_std, x.device)
        a, b = a.to(x.dtype), b.to(x.dtype)
        x_a = interpolate(x, z, a)
        u, target = average_velocity_and_target(net, x_a, a, b, x - z, batch.label)
        error = (u - target).pow(2).flatten(1).mean(1)
        weight = (error.detach() + self.c).pow(-self.power)
        self.last_metrics = {"mse": error.mean().detach()}
        return (weight * error).mean()
