"""Teachers from elsewhere (docs/methods.md §8): every conversion against the closed-form Gaussian answers.

Data x ~ N(mu, s^2 I): every prediction a diffusion or flow model can make (eps, x0, v, EDM's denoiser, a
flow-matching velocity) is a posterior mean in closed form. A stand-in "model" returns that exact
prediction in its own units; the wrapped velocity must then be the exact RF velocity
v*(x_t, t) = E[x | x_t] - E[z | x_t], and solving it must give the affine RF flow map x_1 = mu + s z_hat.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from pipeline.flow import EPS, dopri5, expand_time
from pipeline.teachers.conversion import (
    DirectVelocity,
    EDMVelocity,
    FlowMatchingVelocity,
    VPVelocity,
    alpha_bar_at,
    describe,
)

SHAPE = (1, 4, 4)
STD = 0.6


def posterior(x_noisy: Tensor, signal: Tensor, noise: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """E[x | y], E[n | y] for y = signal x + noise n, x ~ N(mu, STD^2 I), n ~ N(0, I); signal/noise (B,)."""
    a, s = expand_time(signal.double(), x_noisy), expand_time(noise.double(), x_noisy)
    var = a.square() * STD**2 + s.square()
    resid = x_noisy.double() - a * mu
    return mu + a * STD**2 * resid / var, s * resid / var


def exact_velocity(x_t: Tensor, t: Tensor, mu: Tensor) -> Tensor:
    x_hat, z_hat = posterior(x_t, t.double(), 1 - t.double(), mu)
    return x_hat - z_hat


class GaussianVP(nn.Module):
    """The exact eps / x0 / v prediction of a VP model, called as net(x_tau, tau, label)."""

    def __init__(self, mu: Tensor, alphas_cumprod: Tensor, prediction: str) -> None:
        super().__init__()
        self.mu, self.table, self.prediction = mu, alphas_cumprod, prediction

    def forward(self, x_tau: Tensor, tau: Tensor, label: Tensor) -> Tensor:
        alpha_bar = alpha_bar_at(tau, self.table)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_hat, eps_hat = posterior(x_tau, a, s, self.mu)
        if self.prediction == "epsilon":
            return eps_hat
        if self.prediction == "x0":
            return x_hat
        return expand_time(a, x_tau) * eps_hat - expand_time(s, x_tau) * x_hat  # v_vp = a eps - s x


class GaussianEDM(nn.Module):
    """EDM's denoiser D(x_sigma; sigma) = E[x | x + sigma n]."""

    def __init__(self, mu: Tensor) -> None:
        super().__init__()
        self.mu = mu

    def forward(self, x_sigma: Tensor, sigma: Tensor, label: Tensor) -> Tensor:
        return posterior(x_sigma, torch.ones_like(sigma), sigma, self.mu)[0]


class GaussianFlowMatching(nn.Module):
    """A flow-matching model with data at s = 0: x_s = (1 - s) x + s n, predicts n - x, time input s * 1000."""

    def __init__(self, mu: Tensor) -> None:
        super().__init__()
        self.mu = mu

    def forward(self, x_s: Tensor, time: Tensor, label: Tensor) -> Tensor:
        s = time.double() / 1000
        x_hat, n_hat = posterior(x_s, 1 - s, s, self.mu)
        return n_hat - x_hat


class GaussianVelocity(nn.Module):
    def __init__(self, mu: Tensor) -> None:
        super().__init__()
        self.mu = mu

    def forward(self, x_t: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return exact_velocity(x_t, t, self.mu)


def ddpm_table(steps: int = 1000) -> Tensor:
    """diffusers' default DDPM schedule (linear betas 1e-4..0.02)."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def wide_table(steps: int = 2000) -> Tensor:
    """A VP table whose t range, [1e-4, 1 - 1e-6], covers the samplers' whole span [EPS, 1)."""
    snr = torch.linspace(2 * math.log((1 - 1e-6) / 1e-6), 2 * math.log(1e-4 / (1 - 1e-4)), steps, dtype=torch.float64)
    return torch.sigmoid(snr)


@pytest.fixture
def mu() -> Tensor:
    return torch.linspace(-0.8, 0.8, math.prod(SHAPE), dtype=torch.float64).reshape(SHAPE)


def wrappers(mu: Tensor, table: Tensor) -> dict[str, nn.Module]:
    made: dict[str, nn.Module] = {}
    for prediction in ("epsilon", "x0", "v"):
        wrapper = VPVelocity(nn.Identity(), table, prediction)  # type: ignore[arg-type]
        wrapper.net = GaussianVP(mu, wrapper.alphas_cumprod, prediction)
        made[prediction] = wrapper
    made["edm"] = EDMVelocity(GaussianEDM(mu), sigma_min=1e-6, sigma_max=1e4)
    made["flow"] = FlowMatchingVelocity(GaussianFlowMatching(mu), time_scale=1000)
    made["velocity"] = DirectVelocity(GaussianVelocity(mu))
    return made


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v", "edm", "flow", "velocity"])
@pytest.mark.parametrize("table", [ddpm_table, wide_table])
def test_each_prediction_gives_the_exact_rf_velocity(mu: Tensor, prediction: str, table) -> None:  # noqa: ANN001
    wrapper = wrappers(mu, table())[prediction]
    low, high = wrapper.t_range
    t = torch.linspace(low, high, 401, dtype=torch.float64)[1:-1]
    x_t = torch.randn((len(t), *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    got, want = wrapper(x_t, t, torch.zeros(len(t), dtype=torch.long)), exact_velocity(x_t, t, mu)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_ddpm_table_range_and_clamp(mu: Tensor) -> None:
    """DDPM's linear table reaches t in [0.0063, 0.990]; outside it the wrapper answers as at the nearest end."""
    wrapper = wrappers(mu, ddpm_table())["epsilon"]
    low, high = wrapper.t_range
    assert low == pytest.approx(0.00631, abs=1e-4) and high == pytest.approx(0.99010, abs=1e-4)
    x = torch.randn((3, *SHAPE), dtype=torch.float64)
    label = torch.zeros(3, dtype=torch.long)
    for outside, end in ((1e-3, low), (1.0, high)):
        torch.testing.assert_close(wrapper(x, torch.full((3,), outside, dtype=torch.float64), label),
                                   wrapper(x, torch.full((3,), end, dtype=torch.float64), label))  # fmt: skip
    assert "clamped outside" in describe(wrapper) and "epsilon" in describe(wrapper)


def test_timestep_inverts_the_table(mu: Tensor) -> None:
    """tau found for t lands where the table's (interpolated) alpha-bar gives back exactly t = a/(a+s)."""
    wrapper = wrappers(mu, ddpm_table())["epsilon"]
    t = torch.linspace(0.01, 0.98, 97, dtype=torch.float64)
    t_c, tau = wrapper.timestep(t)
    alpha_bar = alpha_bar_at(tau, wrapper.alphas_cumprod)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    torch.testing.assert_close(a / (a + s), t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t_c, t)
    assert bool((tau[1:] < tau[:-1]).all())  # later RF time = less noise = smaller DDPM timestep


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v", "edm", "flow", "velocity"])
def test_solving_the_wrapped_velocity_gives_the_rf_flow_map(mu: Tensor, prediction: str) -> None:
    """From noise z at t = EPS the exact flow ends at mu + s z_hat, z = EPS mu + sqrt(EPS^2 s^2 + (1-EPS)^2) z_hat."""
    wrapper = wrappers(mu, wide_table())[prediction]
    z = torch.randn((16, *SHAPE), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z_hat = (z - EPS * mu) / math.sqrt(EPS**2 * STD**2 + (1 - EPS) ** 2)
    result = dopri5(wrapper, z, torch.zeros(16, dtype=torch.long), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.x, mu + STD * z_hat, rtol=1e-5, atol=1e-5)


def test_vp_refuses_a_table_that_does_not_fall() -> None:
    with pytest.raises(ValueError, match="fall"):
        VPVelocity(nn.Identity(), torch.linspace(0.1, 0.9, 10), "epsilon")
    with pytest.raises(ValueError, match="epsilon, x0 or v"):
        VPVelocity(nn.Identity(), ddpm_table(), "score")  # type: ignore[arg-type]
