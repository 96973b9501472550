"""Exact conversions of diffusion/flow predictions into slimstep's velocity v(x_t, t, label) (docs/methods.md §8).

slimstep's convention: noise z at t = 0, data x at t = 1, x_t = t x + (1 - t) z, v = x - z. Every wrapper
takes the foreign net called in its own units, `net(x_model, time_model, label) -> prediction`, and is
itself a velocity net `v(x_t, t, label)`, so samplers, losses and eval use it like a trained teacher.
Outside a model's trained noise range t is clamped to the nearest trained time (state and formula alike):
the range is a property of the wrapper (`t_range`) and the teacher's meta records it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.flow import expand_time

VPPrediction = Literal["epsilon", "x0", "v"]


def vp_time(alpha_bar: Tensor) -> Tensor:
    """RF time of a VP noise level: t = a / (a + s) with a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return a / (a + s)


def log_snr(alpha_bar: Tensor) -> Tensor:
    """log(alpha_bar / (1 - alpha_bar)), clipped away from 0 and 1 so zero-SNR tables stay finite."""
    alpha_bar = alpha_bar.double().clamp(1e-20, 1 - 1e-16)
    return alpha_bar.log() - (-alpha_bar).log1p()


def alpha_bar_at(tau: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The table's alpha_bar at a fractional timestep tau in [0, T-1]: linear in log-SNR between entries.

    This is how the wrappers read a table between its entries; a stand-in model built on the same rule
    sees exactly the noise level the wrapper meant.
    """
    table = log_snr(alphas_cumprod.to(tau.device))
    tau = tau.double().clamp(0, len(table) - 1)
    low = tau.floor().long().clamp(max=len(table) - 2)
    frac = tau - low
    snr = table[low] + frac * (table[low + 1] - table[low])
    return torch.sigmoid(snr)


class VPVelocity(nn.Module):
    """A VP diffusion model (DDPM/DDIM: x_tau = a x + s eps, a^2 + s^2 = 1) as an RF velocity.

    The RF state at t = a/(a+s) is x_tau/(a+s). Given t, tau solves alpha_bar(tau) = t^2/(t^2 + (1-t)^2) on
    the model's table (log-SNR 2 logit(t), interpolated), the net sees x_tau = x_t / r with r = sqrt(t^2 +
    (1-t)^2), and v = x0_hat - eps_hat, which per prediction type is
    epsilon: (x_t - eps_hat) / t;  x0: (x0_hat - x_t) / (1 - t);  v: ((2t - 1) x_t / r^2 - v_hat / r).
    """

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, prediction: VPPrediction) -> None:
        super().__init__()
        if prediction not in ("epsilon", "x0", "v"):
            raise ValueError(f"VP prediction must be epsilon, x0 or v; got {prediction!r}")
        table = log_snr(alphas_cumprod)
        if not bool((table[1:] < table[:-1]).all()):
            raise ValueError("alphas_cumprod must fall strictly with the timestep")
        self.net, self.prediction = net, prediction
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone())

    @property
    def t_range(self) -> tuple[float, float]:
        ends = vp_time(self.alphas_cumprod[[-1, 0]].double())
        return float(ends[0]), float(ends[1])

    def timestep(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) RF times -> (the clamped times, the fractional timesteps tau the net is called at), float64."""
        table = log_snr(self.alphas_cumprod)  # falls with tau
        target = 2 * torch.logit(t.double().clamp(1e-12, 1 - 1e-12))
        target = target.clamp(float(table[-1]), float(table[0]))
        ascending = table.flip(0)
        upper = torch.searchsorted(ascending, target).clamp(1, len(table) - 1)
        lo_snr, hi_snr = ascending[upper - 1], ascending[upper]
        frac = (target - lo_snr) / (hi_snr - lo_snr)  # position between the two entries, 0 at the lower SNR
        tau = (len(table) - upper) - frac  # index in the falling table
        return torch.sigmoid(target / 2), tau

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """x (B,*shape) RF state at t (B,), label (B,) -> v (B,*shape)."""
        t_c, tau = self.timestep(t)
        r = (t_c.square() + (1 - t_c).square()).sqrt()
        t_c, r = expand_time(t_c, x), expand_time(r, x)
        out = self.net((x / r.to(x.dtype)), tau.to(x.dtype), label).double()
        x64 = x.double()
        if self.prediction == "epsilon":
            v = (x64 - out) / t_c
        elif self.prediction == "x0":
            v = (out - x64) / (1 - t_c)
        else:
            v = (2 * t_c - 1) * x64 / r.square() - out / r
        return v.to(x.dtype)


class EDMVelocity(nn.Module):
    """An EDM / VE denoiser D(x_sigma; sigma), x_sigma = x + sigma n, as an RF velocity.

    t = 1/(1 + sigma), x_sigma = x_t / t, v = D - (x_sigma - D) / sigma; sigma clamped to [sigma_min, sigma_max].
    """

    def __init__(self, net: nn.Module, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.net, self.sigma_min, self.sigma_max = net, sigma_min, sigma_max

    @property
    def t_range(self) -> tuple[float, float]:
        return 1 / (1 + self.sigma_max), 1 / (1 + self.sigma_min)

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """x (B,*shape) RF state at t (B,), label (B,) -> v (B,*shape)."""
        low, high = self.t_range
        t_c = t.double().clamp(low, high)
        sigma = (1 - t_c) / t_c
        x_sigma = x.double() / expand_time(t_c, x)
        d = self.net(x_sigma.to(x.dtype), sigma.to(x.dtype), label).double()
        return (d - (x_sigma - d) / expand_time(sigma, x)).to(x.dtype)


class FlowMatchingVelocity(nn.Module):
    """A flow-matching model with data at s = 0, noise at s = 1 (diffusers' FlowMatch schedulers, SD3).

    Its state x_s = (1 - s) x + s n is ours at t = 1 - s; it predicts n - x, so v = -prediction. The net's
    time input is s * `time_scale` (diffusers feeds sigma * num_train_timesteps).
    """

    t_range = (0.0, 1.0)

    def __init__(self, net: nn.Module, time_scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.time_scale = net, time_scale

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """x (B,*shape) RF state at t (B,), label (B,) -> v (B,*shape)."""
        return -self.net(x, ((1 - t) * self.time_scale).to(x.dtype), label)


class DirectVelocity(nn.Module):
    """A net that already predicts slimstep's velocity with noise at t = 0 (its own wrapper scales t)."""

    t_range = (0.0, 1.0)

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return self.net(x, t, label)


def describe(wrapper: nn.Module) -> str:
    """One line for the teacher's meta: which conversion and over which t range it is exact."""
    low, high = wrapper.t_range
    span = f"exact for t in [{low:.4g}, {high:.4g}]" + ("" if (low, high) == (0.0, 1.0) else ", clamped outside")
    if isinstance(wrapper, VPVelocity):
        rule = {"epsilon": "v = (x_t - eps)/t", "x0": "v = (x0 - x_t)/(1 - t)", "v": "v = ((2t-1) x_t/r^2 - v_vp/r)"}
        steps = len(wrapper.alphas_cumprod)
        return (f"VP {wrapper.prediction}: tau from log-SNR 2 logit(t) on the {steps}-entry alpha-bar table, "
                f"x_tau = x_t/sqrt(t^2+(1-t)^2), {rule[wrapper.prediction]}; {span}")  # fmt: skip
    if isinstance(wrapper, EDMVelocity):
        return f"EDM denoiser: sigma = (1-t)/t, x_sigma = x_t/t, v = D - (x_sigma - D)/sigma; {span}"
    if isinstance(wrapper, FlowMatchingVelocity):
        return f"flow matching (data at 0): time = (1-t)*{wrapper.time_scale:g}, v = -prediction; {span}"
    return f"velocity (noise at t = 0), used as it is; {span}"
