"""SlimFlow losses against hand computations: beta schedules, noise mixing, flip, 2-step target, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from pipeline.flow import EPS, Batch, ExactVelocity, RectifiedFlowLoss, euler, one_step
from pipeline.slimflow import (
    AnnealingReflowLoss,
    FlowGuidedDistillationLoss,
    beta,
    huber_c_default,
    l2_distance,
    mix_noise,
    pseudo_huber,
)

SHAPE = (1, 4, 4)


class TinyNet(nn.Module):
    """Linear velocity v(x, t, label) on flattened x, t and a label embedding; enough for gradient checks."""

    def __init__(self, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(dim + 1, dim)
        self.emb = nn.Embedding(classes, dim)

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        h = self.lin(torch.cat([x.flatten(1), t[:, None]], 1)) + self.emb(label)
        return h.reshape(x.shape)


def pair_batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=g) * 2 - 1
    return Batch(x=x, label=torch.randint(4, (n,), generator=g), z=torch.randn((n, *SHAPE), generator=g))


# Annealing reflow.


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [1.0, 0.5, 0.0, 0.0]),
        ("exp", [1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-2.0)]),
        ("cos", [1.0, 0.5, 0.0, 0.0]),
        ("constant", [0.3, 0.3, 0.3, 0.3]),
    ],
)
def test_beta_schedules_at_0_half_full_and_twice_the_window(schedule: str, expected: list[float]) -> None:
    total, frac = 800, 0.375  # W = 300
    got = [beta(k, total, schedule, frac, constant=0.3) for k in (0, 150, 300, 600)]  # type: ignore[arg-type]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "args",
    [(0, 100, "square", 0.5, 0.0), (0, 100, "linear", 0.0, 0.0), (-1, 100, "linear", 0.5, 0.0),
     (0, 0, "linear", 0.5, 0.0), (0, 100, "constant", 0.5, 1.5)],
)  # fmt: skip
def test_beta_rejects_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        beta(*args)


@pytest.mark.parametrize("b", [0.0, 0.3, 0.6, 1.0])
def test_mixed_noise_stays_standard_normal_with_the_right_correlation(b: float) -> None:
    torch.manual_seed(0)
    z = torch.randn(400_000)
    z_beta = mix_noise(z, b)
    assert abs(z_beta.mean().item()) < 0.01
    assert z_beta.var().item() == pytest.approx(1.0, abs=0.01)
    assert torch.corrcoef(torch.stack([z, z_beta]))[0, 1].item() == pytest.approx(
        math.sqrt(1 - b**2), abs=0.01
    )


def test_beta_zero_is_plain_reflow_by_hand() -> None:
    net, batch = TinyNet(), pair_batch()
    loss = AnnealingReflowLoss(total_steps=100, schedule="constant", window_frac=0.5, beta_constant=0.0)
    torch.manual_seed(1)
    got = loss(net, batch, step=7)
    torch.manual_seed(1)
    t = EPS + (1 - EPS) * torch.rand(len(batch.label))
    tt = t[:, None, None, None]
    by_hand = (net(tt * batch.x + (1 - tt) * batch.z, t, batch.label) - (batch.x - batch.z)).pow(2).mean()
    torch.manual_seed(1)
    reflow = RectifiedFlowLoss()(net, batch)
    assert torch.equal(got, by_hand) and torch.equal(got, reflow)
    assert loss.last_metrics == {"beta": 0.0}


def test_annealing_reports_the_scheduled_beta() -> None:
    loss = AnnealingReflowLoss(total_steps=800, schedule="linear", window_frac=0.375)
    loss(TinyNet(), pair_batch(), step=150)
    assert loss.last_metrics["beta"] == pytest.approx(0.5)


class Recorder(nn.Module):
    """Returns a fixed output and remembers the x_t, t it was queried at."""

    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x_t: Tensor, t: Tensor, label: Tensor) -> Tensor:
        self.x_t, self.t = x_t, t
        return self.out


@pytest.mark.parametrize("flip", [True, False])
def test_flip_mirrors_image_and_noise_together(flip: bool) -> None:
    batch = pair_batch(4)
    x, z = batch.x, batch.z
    assert z is not None
    loss = AnnealingReflowLoss(total_steps=10, schedule="constant", flip=flip)
    flips = 0
    for trial in range(40):
        torch.manual_seed(trial)
        net = Recorder(x - z)
        plain_loss = loss(net, batch)
        tt = net.t[:, None, None, None]
        joint = torch.allclose(net.x_t, tt * x.flip(-1) + (1 - tt) * z.flip(-1))
        assert joint != torch.allclose(net.x_t, tt * x + (1 - tt) * z)  # never x or z alone
        torch.manual_seed(trial)
        flipped_loss = loss(Recorder(x.flip(-1) - z.flip(-1)), batch)
        assert (flipped_loss if joint else plain_loss).item() == 0.0  # the target flips with them
        flips += joint
    assert (0 < flips < 40) if flip else flips == 0


def test_flip_refuses_non_image_data() -> None:
    batch = Batch(x=torch.zeros(4, 2), label=torch.zeros(4, dtype=torch.long), z=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="image"):
        AnnealingReflowLoss(total_steps=10, flip=True)(Recorder(torch.zeros(4, 2)), batch)


# Distances.


def test_distances_by_hand() -> None:
    a, b = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    sq = (a - b).pow(2).flatten(1)
    assert torch.allclose(l2_distance(a, b), sq.mean())
    assert torch.allclose(pseudo_huber(a, b, 0.1), ((sq.sum(1) + 0.01).sqrt() - 0.1).mean())
    c = huber_c_default(16)
    assert c == pytest.approx(0.00054 * 4)
    assert torch.allclose(pseudo_huber(a, b), ((sq.sum(1) + c**2).sqrt() - c).mean())


def test_lpips_without_package_or_weights_fails_clearly(tmp_path) -> None:
    missing = tmp_path / "lpips_vgg.pth"
    with pytest.raises((ImportError, FileNotFoundError), match="lpips") as err:
        FlowGuidedDistillationLoss(None, [0], guidance_weight=0.0, distance="lpips", lpips_weights=missing)
    if err.type is FileNotFoundError:
        assert str(missing) in str(err.value)


# Flow-guided distillation.


def exact_field() -> ExactVelocity:
    g = torch.Generator().manual_seed(3)
    return ExactVelocity(torch.rand((6, *SHAPE), generator=g) * 2 - 1)


@pytest.mark.parametrize("guide_steps", [1, 2])
def test_two_step_target_is_student_step_then_guide_euler(guide_steps: int) -> None:
    v = exact_field()
    loss = FlowGuidedDistillationLoss(v, classes=[0], s_min=0.5, s_max=0.5, guide_steps=guide_steps)
    z, label = torch.randn(5, *SHAPE), torch.zeros(5, dtype=torch.long)
    v0 = v(z, torch.full((5,), EPS), label)
    x_s = z + (0.5 - EPS) * v0
    if guide_steps == 1:
        by_hand = x_s + 0.5 * v(x_s, torch.full((5,), 0.5), label)
    else:
        x_m = x_s + 0.25 * v(x_s, torch.full((5,), 0.5), label)
        by_hand = x_m + 0.25 * v(x_m, torch.full((5,), 0.75), label)
    target = loss.target(v0, z, label)
    assert torch.allclose(target, by_hand, atol=1e-6)
    assert torch.allclose(target, euler(v, x_s, label, steps=guide_steps, eps=0.5).x, atol=1e-6)


def test_full_loss_by_hand_with_exact_student_and_guide() -> None:
    v, batch = exact_field(), pair_batch(6)
    loss = FlowGuidedDistillationLoss(v, classes=[1, 3], s_min=0.3, s_max=0.3, guidance_weight=0.5)
    torch.manual_seed(4)
    got = loss(v, batch)
    torch.manual_seed(4)
    z = torch.randn_like(batch.z)
    label = torch.tensor([1, 3])[torch.randint(2, (6,))]
    x_s = z + (0.3 - EPS) * v(z, torch.full((6,), EPS), label)
    x_2step = x_s + 0.7 * v(x_s, torch.full((6,), 0.3), label)
    pair = l2_distance(one_step(v, batch.z, batch.label), batch.x)
    assert torch.allclose(got, pair + 0.5 * l2_distance(one_step(v, z, label), x_2step), atol=1e-6)
    assert set(loss.last_metrics) == {"pair_loss", "guide_loss"}
    assert torch.allclose(loss.last_metrics["pair_loss"], pair)


def test_guidance_path_carries_no_gradient() -> None:
    torch.manual_seed(0)
    net, guide, batch = TinyNet(), TinyNet(), pair_batch()
    loss = FlowGuidedDistillationLoss(guide, classes=[0, 1, 2, 3], distance="pseudo_huber")
    assert not any(p.requires_grad for p in guide.parameters()) and not guide.training
    torch.manual_seed(5)
    loss(net, batch).backward()
    grads = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]

    net.zero_grad()
    torch.manual_seed(5)
    z = torch.randn_like(batch.z)
    label = torch.arange(4)[torch.randint(4, (len(z),))]
    v = net(z, torch.full((len(z),), EPS), label)
    target = loss.target(v, z, label)
    assert not target.requires_grad
    (
        pseudo_huber(one_step(net, batch.z, batch.label), batch.x) + pseudo_huber(z + (1 - EPS) * v, target)
    ).backward()
    for got, want in zip(grads, (p.grad for p in net.parameters()), strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert all(p.grad is None for p in guide.parameters())


def test_zero_guidance_weight_is_exactly_the_pair_term() -> None:
    def guide(x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        raise AssertionError("the guide must not run when the 2-step term is off")

    net, batch = TinyNet(), pair_batch()
    loss = FlowGuidedDistillationLoss(guide, classes=[0], guidance_weight=0.0)
    rng = torch.get_rng_state()
    got = loss(net, batch)
    assert torch.equal(torch.get_rng_state(), rng)  # the second term is not even drawn
    assert torch.equal(got, l2_distance(one_step(net, batch.z, batch.label), batch.x))
    assert set(loss.last_metrics) == {"pair_loss"}


@pytest.mark.parametrize(
    "kwargs",
    [{"s_min": 0.9, "s_max": 0.2}, {"s_min": 0.0}, {"guide_steps": 0}, {"guidance_weight": -1.0},
     {"distance": "l1"}],
)  # fmt: skip
def test_distillation_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FlowGuidedDistillationLoss(exact_field(), classes=[0], **kwargs)


def test_guidance_needs_a_guide() -> None:
    with pytest.raises(ValueError, match="guide"):
        FlowGuidedDistillationLoss(None, classes=[0], guidance_weight=1.0)
