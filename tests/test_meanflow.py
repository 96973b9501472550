"""MeanFlow against Gaussian data, whose flow, velocity and average velocity are known in closed form."""

import pytest
import torch
from torch import Tensor, nn

from pipeline.flow import EPS, Batch, expand_time, interpolate, sample
from pipeline.meanflow import MeanFlowLoss, MeanFlowNet, average_velocity_and_target, sample_times
from pipeline.modelio import load_model, save_model
from pipeline.nets import NetSpec, count_macs

MU, STD, DIM = 1.5, 0.4, 4


class GaussianAverage(nn.Module):
    """Exact ū(x_a, a, b) of N(mean, std^2 I) data: the chord of x_s = s mean + sqrt(s^2 std^2 + (1 - s)^2) z."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(mean, dtype=torch.float64))
        self.log_std = nn.Parameter(torch.tensor(std, dtype=torch.float64).log())

    def sigma(self, s: Tensor) -> Tensor:
        return (s**2 * self.log_std.exp() ** 2 + (1 - s) ** 2).sqrt()

    def velocity(self, x: Tensor, a: Tensor) -> Tensor:
        """The exact instantaneous velocity v(x_a, a) (the chord's limit b -> a)."""
        a = expand_time(a, x)
        return self.mean + (a * self.log_std.exp() ** 2 - (1 - a)) / self.sigma(a) ** 2 * (x - a * self.mean)

    def forward(self, x: Tensor, a: Tensor, label: Tensor, b: Tensor | None = None) -> Tensor:
        b = torch.ones_like(a) if b is None else b
        gap = expand_time(b - a, x)
        a_, b_ = expand_time(a, x), expand_time(b, x)
        z = (x - a_ * self.mean) / self.sigma(a_)
        chord = (b_ * self.mean + self.sigma(b_) * z - x) / torch.where(gap > 1e-9, gap, torch.ones_like(gap))
        return torch.where(gap > 1e-9, chord, self.velocity(x, a))


def _times(n: int) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    a, b = sample_times(n, flow_fraction=0.25, mean=-0.4, std=1.0)
    return a.double(), b.double()


def _data(n: int) -> tuple[Tensor, Tensor]:
    z = torch.randn(n, DIM, dtype=torch.float64)
    return MU + STD * torch.randn(n, DIM, dtype=torch.float64), z


def test_sample_times_are_the_papers_converted_to_slimstep_time() -> None:
    torch.manual_seed(0)
    a, b = sample_times(20000, flow_fraction=0.75, mean=-0.4, std=1.0)
    assert bool((a <= b).all()) and bool(((a > 0) & (b < 1)).all())
    assert (a == b).float().mean().item() == pytest.approx(0.75, abs=0.02)
    a, b = sample_times(1000, flow_fraction=0.0, mean=-0.4, std=1e-6)  # both paper times ≈ sigmoid(-0.4)
    torch.testing.assert_close(a, torch.full_like(a, 1 - torch.sigmoid(torch.tensor(-0.4)).item()), atol=1e-5, rtol=0)


def test_exact_average_velocity_satisfies_the_identity_and_perturbed_ones_do_not() -> None:
    """With the exact marginal velocity, the MeanFlow target of the exact ū is ū itself (zero loss)."""
    a, b = _times(4096)
    x, z = _data(4096)
    x_a, label = interpolate(x, z, a), torch.zeros(4096, dtype=torch.long)
    errors = []
    for mean, std in ((MU, STD), (MU + 0.2, STD), (MU, STD * 1.3)):
        net = GaussianAverage(mean, std)
        u, target = average_velocity_and_target(net, x_a, a, b, GaussianAverage(MU, STD).velocity(x_a, a), label)
        errors.append((u - target).pow(2).mean().item())
    assert errors[0] < 1e-20 and min(errors[1:]) > 1e-3, errors


def test_training_loss_is_stationary_at_the_exact_average_velocity() -> None:
    """With the conditional velocity x - z (training), the stop-gradient loss has zero gradient at the exact ū
    and a gradient pointing back to it at perturbed ones."""

    def gradient(mean: float, std: float) -> Tensor:
        net = GaussianAverage(mean, std)
        torch.manual_seed(2)
        x = MU + STD * torch.randn(200_000, DIM, dtype=torch.float64)
        MeanFlowLoss(0.25, -0.4, 1.0, power=0.0, c=1e-3)(net, Batch(x=x, label=torch.zeros(200_000).long())).backward()
        return torch.stack([net.mean.grad, net.log_std.grad])

    exact, high_mean, wide = gradient(MU, STD), gradient(MU + 0.2, STD), gradient(MU, STD * 1.3)
    assert exact.abs().max() < 0.05 * min(high_mean[0].abs().item(), wide[1].abs().item()), (exact, high_mean, wide)
    assert high_mean[0] > 0 and wide[1] > 0, "gradient descent moves the mean down and the std down, to the data"


def test_one_step_sample_is_the_exact_flow_map() -> None:
    z, label = torch.randn(512, DIM, dtype=torch.float64), torch.zeros(512, dtype=torch.long)
    net = GaussianAverage(MU, STD)
    x = sample(net, z, label, "onestep").x  # slimstep's sampler: z + (1 - eps) ū(z, eps, 1)
    noise = (z - EPS * MU) / net.sigma(torch.tensor(EPS, dtype=torch.float64))  # z is the flow's state at eps
    torch.testing.assert_close(x, MU + STD * noise)


def test_meanflow_net_is_a_velocity_model_that_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(0)
    spec = NetSpec(kind="resmlp", width=32, depth=2, emb_dim=8)
    net = MeanFlowNet(spec, (1, 4, 4), 3)
    x, t, label = torch.randn(6, 1, 4, 4), torch.rand(6), torch.arange(6) % 3
    torch.testing.assert_close(net(x, t, label), net(x, t, label, torch.ones(6)))
    assert not torch.allclose(net(x, t, label, t), net(x, t, label), atol=1e-4), "the second time is used"
    save_model(tmp_path / "mf", net, {"stage": "meanflow", "kind": "meanflow", "net": spec.model_dump(),
                                      "data_shape": [1, 4, 4], "num_classes": 3})  # fmt: skip
    loaded = load_model(tmp_path / "mf")
    torch.testing.assert_close(loaded.net(x, t, label), net(x, t, label))
    assert count_macs(loaded.net, (1, 4, 4), 3) > 0


def test_meanflow_loss_trains_a_net_towards_the_exact_one_step_map() -> None:
    torch.manual_seed(0)
    net = MeanFlowNet(NetSpec(kind="resmlp", width=64, depth=2, emb_dim=16), (DIM,), 1)
    loss = MeanFlowLoss(0.75, -0.4, 1.0, power=1.0, c=1e-3)
    z = torch.randn(1024, DIM)
    label = torch.zeros(1024, dtype=torch.long)
    target = MU + STD * (z - EPS * MU) / GaussianAverage(MU, STD).sigma(torch.tensor(EPS)).float()

    def gap() -> float:
        with torch.no_grad():
            return (sample(net, z, label, "onestep").x - target).pow(2).mean().item()

    before = gap()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(300):
        x = MU + STD * torch.randn(256, DIM)
        value = loss(net, Batch(x=x, label=torch.zeros(256, dtype=torch.long)), step)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert gap() < 0.2 * before, (before, gap())


def test_target_from_the_moving_rows_alone_equals_one_jvp_over_the_whole_batch() -> None:
    """The JVP runs only where b > a; the target (and the loss's gradient) is the full-batch identity's."""
    torch.manual_seed(3)
    net = MeanFlowNet(NetSpec(kind="resmlp", width=32, depth=2, emb_dim=8), (DIM,), 3).double()
    a, b = _times(64)
    x, z = _data(64)
    label, x_a = torch.arange(64) % 3, interpolate(x, z, a)

    def average(x: Tensor, start: Tensor, end: Tensor) -> Tensor:
        return net(x, start, label, end)

    u_ref, du_da = torch.func.jvp(average, (x_a, a, b), (x - z, torch.ones_like(a), torch.zeros_like(b)))
    target_ref = (x - z) + expand_time(b - a, u_ref) * du_da
    u, target = average_velocity_and_target(net, x_a, a, b, x - z, label)
    assert 0 < int((b > a).sum()) < 64  # both kinds of rows are present
    torch.testing.assert_close(target, target_ref.detach())
    weights = list(net.parameters())
    grads = torch.autograd.grad((u - target).pow(2).sum(), weights)
    for grad, grad_ref in zip(grads, torch.autograd.grad((u_ref - target_ref.detach()).pow(2).sum(), weights),
                              strict=True):  # fmt: skip
        torch.testing.assert_close(grad, grad_ref)
