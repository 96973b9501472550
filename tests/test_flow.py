"""Exact-answer tests of the rectified-flow maths: closed-form Gaussian flow, finite-data oracle, NFE."""

import pytest
import torch
from torch import Tensor

from pipeline import flow
from pipeline.flow import EPS, Batch, ExactVelocity, SamplerSpec


def sigma(t: float | Tensor, s: float) -> float | Tensor:
    """Std of x_t for data N(mu, s^2 I): sqrt(t^2 s^2 + (1 - t)^2)."""
    return (t**2 * s**2 + (1 - t) ** 2) ** 0.5


def gaussian_velocity(mu: Tensor, s: float) -> flow.VelocityFn:
    """Exact 1-RF velocity for x ~ N(mu, s^2 I): d/dt of x_t = t mu + sigma_t z, rewritten in x_t."""

    def v(x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        t = flow.expand_time(t, x)
        return mu + (t * s**2 - (1 - t)) / sigma(t, s) ** 2 * (x - t * mu)

    return v


def gaussian_map(x0: Tensor, mu: Tensor, s: float, t0: float, t1: float) -> Tensor:
    """Exact flow map from state x0 at t0 to t1: the affine map x_t = t mu + sigma_t z."""
    return t1 * mu + sigma(t1, s) / sigma(t0, s) * (x0 - t0 * mu)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a busy CPU (seen: 60 ms per 256x5 matmul)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Counted:
    """Wraps a velocity and counts its calls."""

    def __init__(self, v: flow.VelocityFn) -> None:
        self.v, self.calls = v, 0

    def __call__(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        self.calls += 1
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        return self.v(x, t, label)


MU, S = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.3


@pytest.fixture
def gauss() -> tuple[flow.VelocityFn, Tensor, Tensor, Tensor]:
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return gaussian_velocity(MU, S), z, torch.zeros(64, dtype=torch.long), gaussian_map(z, MU, S, EPS, 1.0)


def err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def test_gaussian_velocity_is_derivative_of_map(gauss):
    v, z, label, _ = gauss
    t, h = 0.4, 1e-6
    x_t = gaussian_map(z, MU, S, EPS, t)
    fd = (gaussian_map(z, MU, S, EPS, t + h) - gaussian_map(z, MU, S, EPS, t - h)) / (2 * h)
    assert err(v(x_t, torch.full((64,), t, dtype=torch.float64), label), fd) < 1e-6


def test_samplers_match_closed_form(gauss):
    v, z, label, x1 = gauss
    assert err(flow.euler(v, z, label, 2000).x, x1) < 2e-3
    assert err(flow.heun(v, z, label, 200).x, x1) < 3e-4  # dominated by the final Euler step, O(h^2)
    assert err(flow.dopri5(v, z, label, rtol=1e-8, atol=1e-8).x, x1) < 1e-6
    mid = gaussian_map(z, MU, S, 0.2, 0.7)
    assert err(flow.heun(v, z, label, 400, eps=0.2, t_end=0.7).x, mid) < 2e-5


@pytest.mark.parametrize(("solver", "ratio"), [(flow.euler, 2.0), (flow.heun, 4.0)])
def test_convergence_order(gauss, solver, ratio):
    v, z, label, x1 = gauss
    errs = [err(solver(v, z, label, n).x, x1) for n in (40, 80, 160)]
    for coarse, fine in zip(errs[:-1], errs[1:], strict=True):
        assert coarse / fine == pytest.approx(ratio, rel=0.12)


def test_warped_grid_packs_steps_toward_the_data_end(gauss):
    """t_k = eps + (1 - eps)(1 - (1 - k/N)^w): same endpoints, shrinking steps; Heun keeps order 2 on it."""
    v, z, label, x1 = gauss
    counted = Counted(v)
    times: list[float] = []
    flow.euler(lambda x, t, lab: times.append(t[0].item()) or counted(x, t, lab), z, label, 4, warp=2.0)
    want = [EPS + (1 - EPS) * (1 - (1 - k / 4) ** 2) for k in range(4)]  # 0.001, 0.43766, 0.75025, 0.93756
    assert times == pytest.approx(want, abs=1e-12) and counted.calls == 4
    steps = [b - a for a, b in zip(want + [1.0], (want + [1.0])[1:], strict=False)]
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))
    errs = [err(flow.heun(v, z, label, n, warp=2.0).x, x1) for n in (40, 80, 160)]
    for coarse, fine in zip(errs[:-1], errs[1:], strict=True):
        assert coarse / fine == pytest.approx(4.0, rel=0.15)
    assert torch.equal(flow.sample(v, z, label, "heun-8-w2").x, flow.heun(v, z, label, 8, warp=2.0).x)
    assert flow.sample(counted, z, label, "heun-8-w2").nfe == 15
    with pytest.raises(ValueError, match="warp"):
        flow.heun(v, z, label, 8, warp=0.5)


def test_nfe_counts_are_exact(gauss):
    v, z, label, _ = gauss
    for name, want in [("euler-7", 7), ("heun-1", 1), ("heun-5", 9), ("onestep", 1), ("dopri5-1e-05", None)]:
        counted = Counted(v)
        result = flow.sample(counted, z, label, name)
        assert result.nfe == counted.calls
        assert want is None or result.nfe == want
    assert counted.calls > 6  # dopri5 really adapted (at least one step of 6 stages)


def test_sample_dispatches_to_named_solver(gauss):
    v, z, label, _ = gauss
    assert torch.equal(flow.sample(v, z, label, "heun-8").x, flow.heun(v, z, label, 8).x)
    assert torch.equal(flow.sample(v, z, label, "euler-3").x, flow.euler(v, z, label, 3).x)
    assert torch.equal(flow.sample(v, z, label, "onestep").x, flow.one_step(v, z, label))
    assert torch.equal(flow.sample(v, z, label, "dopri5-0.001").x, flow.dopri5(v, z, label, 1e-3, 1e-3).x)


def test_samplers_run_without_grad_and_one_step_keeps_it():
    net = torch.nn.Linear(2, 2)

    def v(x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return net(x) * t[:, None]

    z, label = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    for name in ("euler-2", "heun-2", "dopri5-0.01", "onestep"):
        assert not flow.sample(v, z, label, name).x.requires_grad
    assert flow.one_step(v, z, label).requires_grad


DATA = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, -1.0], [1.0, -0.5], [-0.8, -0.2]])
LABELS = torch.tensor([0, 0, 1, 1, 2])


def nearest(x: Tensor, data: Tensor) -> tuple[Tensor, Tensor]:
    return torch.cdist(x, data).min(dim=1)


def test_exact_velocity_carries_noise_to_data():
    z, label = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)), torch.zeros(256).long()
    x = flow.dopri5(ExactVelocity(DATA), z, label, t_end=1 - 1e-3).x
    dist, idx = nearest(x, DATA)
    assert dist.max() < 0.02
    assert len(idx.unique()) == len(DATA)  # every data point is reached


def test_exact_velocity_respects_labels():
    z = torch.randn(120, 2, generator=torch.Generator().manual_seed(2))
    label = torch.arange(120) % 3
    x = flow.dopri5(ExactVelocity(DATA, LABELS), z, label, t_end=1 - 1e-3).x
    dist, idx = nearest(x, DATA)
    assert dist.max() < 0.02
    assert torch.equal(LABELS[idx], label)


def test_exact_velocity_matches_direct_formula_any_shape():
    g = torch.Generator().manual_seed(3)
    data, x_t = torch.rand(7, 1, 4, 4, generator=g) * 2 - 1, torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0.01, 0.3, 0.5, 0.9, 0.99])
    d2 = ((x_t[:, None] - t[:, None, None, None, None] * data[None]) ** 2).flatten(2).sum(-1)  # (B, N)
    w = torch.softmax(-d2 / (2 * (1 - t[:, None]) ** 2), dim=1)
    want = (torch.einsum("bn,nchw->bchw", w, data) - x_t) / (1 - t[:, None, None, None])
    got = ExactVelocity(data)(x_t, t, torch.zeros(5).long())
    assert got.shape == x_t.shape and got.dtype == x_t.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_single_point_oracle_is_straight_and_zero_loss():
    x0 = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    v = ExactVelocity(x0)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    label = torch.zeros(32).long()
    assert err(flow.one_step(v, z, label), x0.expand(32, 2)) < 1e-12  # one Euler step is exact
    assert flow.straightness(v, z, label) < 1e-20
    t = torch.full((32,), 0.6, dtype=torch.float64)
    x_t = flow.interpolate(x0.expand(32, 2), z, t)
    assert err(flow.denoise(x_t, t, v(x_t, t, label)), x0.expand(32, 2)) < 1e-12
    assert flow.RectifiedFlowLoss()(v, Batch(x0.expand(32, 2), label)).item() < 1e-20


def test_straightness():
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    label = torch.zeros(16).long()
    const = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert flow.straightness(lambda x, t, lab: const.expand_as(x), z, label, steps=10) < 1e-20
    v = gaussian_velocity(MU, S)
    s = flow.straightness(v, z, label, steps=20)
    # Direct definition along the same Euler path.
    ts = [EPS + k * (1 - EPS) / 20 for k in range(20)]
    x, vs = z, []
    for t in ts:
        vs.append(v(x, torch.full((16,), t, dtype=torch.float64), label))
        x = x + (1 - EPS) / 20 * vs[-1]
    direct = torch.stack([((x - z) / (1 - EPS) - vk) ** 2 for vk in vs]).mean().item()
    assert s == pytest.approx(direct, rel=1e-9)
    assert s > 0.01


def test_loss_of_exact_velocity_beats_wrong_ones():
    torch.manual_seed(0)
    x = MU + S * torch.randn(4096, 3, dtype=torch.float64)
    batch = Batch(x, torch.zeros(4096).long())
    exact = gaussian_velocity(MU, S)
    losses = []
    for v in (exact, lambda x, t, lab: 1.2 * exact(x, t, lab), lambda x, t, lab: exact(x, t, lab) + 0.1):
        torch.manual_seed(1)  # same noise and times for every candidate
        losses.append(flow.RectifiedFlowLoss()(v, batch, step=3).item())
    assert losses[0] < min(losses[1:])


def test_loss_uses_paired_noise():
    net = torch.nn.Linear(3, 3)
    x, z = torch.randn(8, 3), torch.randn(8, 3)
    batch = Batch(x, torch.zeros(8).long(), z)
    torch.manual_seed(5)
    loss = flow.RectifiedFlowLoss()(lambda x_t, t, lab: net(x_t) * t[:, None], batch)
    torch.manual_seed(5)
    t = flow.sample_time(8)
    want = ((net(t[:, None] * x + (1 - t[:, None]) * z) * t[:, None] - (x - z)) ** 2).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert net.weight.grad is not None


def test_helpers():
    x, z = torch.ones(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    assert flow.expand_time(torch.ones(4), x).shape == (4, 1, 1, 1)
    assert torch.equal(flow.interpolate(x, z, torch.ones(4)), x)
    assert torch.equal(flow.interpolate(x, z, torch.zeros(4)), z)
    t = flow.sample_time(10_000)
    assert t.min() >= EPS and t.max() <= 1 and abs(t.mean().item() - (1 + EPS) / 2) < 0.02
    batch = Batch(x, torch.zeros(4).long()).to("cpu")
    assert batch.z is None and torch.equal(batch.x, x)


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("euler-4", SamplerSpec("euler", steps=4)),
        ("heun-8", SamplerSpec("heun", steps=8)),
        ("heun-16-w2", SamplerSpec("heun", steps=16, warp=2.0)),
        ("euler-4-w1.5", SamplerSpec("euler", steps=4, warp=1.5)),
        ("dopri5-1e-05", SamplerSpec("dopri5", tol=1e-5)),
        ("onestep", SamplerSpec("onestep")),
    ],
)
def test_parse_sampler_round_trips(name, spec):
    assert flow.parse_sampler(name) == spec
    assert spec.name == name


@pytest.mark.parametrize(
    "name",
    ["euler-0", "foo", "dopri5-x", "heun--1", "dopri5-0", "dopri5-nan", "euler-2.5", "Euler-4", "", "heun-8-w0.5",
     "heun-8-w", "dopri5-1e-05-w2"],
)
def test_parse_sampler_rejects(name):
    with pytest.raises(ValueError, match="allowed forms") as info:
        flow.parse_sampler(name)
    assert repr(name) in str(info.value) and "dopri5-TOL" in str(info.value)


def test_step_count_must_be_positive():
    with pytest.raises(ValueError):
        flow.euler(lambda x, t, lab: x, torch.zeros(1, 2), torch.zeros(1).long(), 0)
