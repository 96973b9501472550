"""MSD: partitions, router and its artifact, TSM, and DMD against an exactly known Gaussian teacher."""

import copy
import io

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pipeline.config import TrainSection
from pipeline.data import Dataset, RandomBatches
from pipeline.flow import EPS, Batch, RectifiedFlowLoss, expand_time, interpolate, sample_time
from pipeline.modelio import load_model
from pipeline.msd import (
    DMDLoss,
    FeatureDiscriminator,
    Router,
    TeacherScoreMatchingLoss,
    karras_time,
    load_router,
    partition_classes,
    save_router,
)
from pipeline.msd.losses import discriminator_loss, dm_times, generator_gan_loss
from pipeline.nets import NetSpec, build_net
from pipeline.training import train

TINY = NetSpec(kind="mlp", width=32, depth=2, emb_dim=8)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: extra threads only add sync cost (20x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Partitions.


@pytest.mark.parametrize("method", ["consecutive", "kmeans", "random"])
@pytest.mark.parametrize(("num_classes", "k"), [(10, 1), (10, 3), (10, 4), (10, 10), (7, 2), (8, 2), (5, 5)])
def test_partition_covers_every_class_once_in_equal_groups(num_classes: int, k: int, method: str) -> None:
    means = torch.randn(num_classes, 3, generator=torch.Generator().manual_seed(1))
    groups = partition_classes(num_classes, k, method, class_means=means, seed=3)  # type: ignore[arg-type]
    assert len(groups) == k
    assert sorted(c for g in groups for c in g) == list(range(num_classes))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert groups == partition_classes(num_classes, k, method, class_means=means, seed=3)  # type: ignore[arg-type]


def test_consecutive_groups_are_contiguous_ranges() -> None:
    assert partition_classes(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for group in partition_classes(23, 5):
        assert group == list(range(group[0], group[-1] + 1))


def test_kmeans_groups_classes_whose_means_are_close() -> None:
    centres = torch.tensor([[5.0, 5.0, 0.0], [-5.0, -5.0, 0.0]])
    noise = 0.5 * torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    means = centres[torch.arange(8) % 2] + noise  # even classes near one centre, odd near the other
    for seed in range(4):
        assert partition_classes(8, 2, "kmeans", class_means=means, seed=seed) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_random_partition_is_seeded() -> None:
    assert partition_classes(10, 2, "random", seed=0) != partition_classes(10, 2, "random", seed=1)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_invalid_k_raises(k: int) -> None:
    with pytest.raises(ValueError, match="1 <= k <= num_classes"):
        partition_classes(10, k)


def test_unknown_method_and_missing_means_raise() -> None:
    with pytest.raises(ValueError, match="allowed"):
        partition_classes(10, 2, "spectral")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class_means"):
        partition_classes(10, 2, "kmeans")
    with pytest.raises(ValueError, match="class_means"):
        partition_classes(10, 2, "kmeans", class_means=torch.zeros(9, 2))


# Router.


class Shift(nn.Module):
    """Toy student: v = x + its own constant; records the labels of every call."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        self.calls.append(label.clone())
        return x + self.value


def test_router_sends_each_sample_to_its_owner_in_input_order() -> None:
    groups = partition_classes(10, 3)
    students = [Shift(float(k)) for k in range(3)]
    router = Router.from_students(students, groups, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    label = torch.randperm(40, generator=gen) % 10  # shuffled, every class present
    x = torch.randn(40, 1, 8, 8, generator=gen)
    v = router(x, torch.rand(40, generator=gen), label)
    owner = torch.tensor([k for c in range(10) for k, g in enumerate(groups) if c in g])
    assert torch.allclose(v - x, expand_time(owner[label].float(), x).expand_as(x))
    assert router.groups == groups and router.num_classes == 10
    for student, group in zip(students, groups, strict=True):
        assert len(student.calls) == 1, "one batched call per student"
        assert set(student.calls[0].tolist()) == set(group)


def test_router_rejects_groups_that_are_not_a_partition() -> None:
    two = [Shift(0.0), Shift(1.0)]
    for groups in ([[0, 1], [1, 2]], [[0], [2]], [[0, 1, 2], []]):
        with pytest.raises(ValueError, match="cover"):
            Router.from_students(two, groups, num_classes=3)
    with pytest.raises(ValueError, match="students"):
        Router.from_students(two, [[0, 1, 2]], num_classes=3)


def test_router_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    router = Router.from_students([build_net(TINY, (2,), 6) for _ in range(2)], partition_classes(6, 2), 6)
    save_router(router, tmp_path / "msd", {"stage": "msd@test", "data_shape": [2], "net": TINY.model_dump()})
    x, t, label = torch.randn(12, 2), torch.rand(12), torch.arange(12) % 6
    expected = router(x, t, label)
    loaded = load_router(tmp_path / "msd")
    custom = load_router(tmp_path / "msd", build_student=lambda spec: build_net(NetSpec(**spec), (2,), 6))
    generic = load_model(tmp_path / "msd")  # eval and `slimstep sample` load routers like any model
    for model in (loaded, custom, generic):
        assert model.meta["groups"] == [[0, 1, 2], [3, 4, 5]] and model.meta["kind"] == "router"
        assert torch.equal(model.net(x, t, label), expected)


# Teacher Score Matching.


class PlusOffClass(nn.Module):
    """The teacher's velocity, plus 1 for labels other than 0: TSM restricted to class 0 sees no gap."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher, self.bias = teacher, nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return self.teacher(x, t, label) + self.bias * expand_time((label != 0).float(), x)


def test_tsm_counts_only_its_classes() -> None:
    torch.manual_seed(0)
    teacher = build_net(TINY, (2,), 3)
    student = PlusOffClass(teacher)
    batch = Batch(x=torch.randn(30, 2), label=torch.arange(30) % 3)
    assert TeacherScoreMatchingLoss(teacher, [0])(student, batch).item() == 0.0
    assert TeacherScoreMatchingLoss(teacher, [0, 1])(student, batch).item() > 0.1
    nobody = TeacherScoreMatchingLoss(teacher, [0])(student, Batch(x=batch.x, label=batch.label.clamp(min=1)))
    nobody.backward()  # no sample of its classes: a zero that still backpropagates
    assert nobody.item() == 0.0 and student.bias.grad.item() == 0.0


def test_tsm_training_closes_the_velocity_gap_on_held_out_noise() -> None:
    torch.manual_seed(0)
    teacher, student = build_net(TINY, (2,), 3), build_net(TINY, (2,), 3)
    loss = TeacherScoreMatchingLoss(teacher, classes=[0, 1])
    x, label = 0.5 * torch.randn(512, 2), torch.arange(512) % 3

    held_x, held_label = 0.5 * torch.randn(256, 2), torch.arange(256) % 2
    held_t = sample_time(256)
    held_xt = interpolate(held_x, torch.randn(256, 2), held_t)

    def gap() -> float:
        with torch.no_grad():
            return (student(held_xt, held_t, held_label) - teacher(held_xt, held_t, held_label)).pow(2).mean().item()

    before = gap()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for step in range(200):
        idx = torch.randint(512, (128,))
        value = loss(student, Batch(x=x[idx], label=label[idx]), step)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert gap() < 0.2 * before


# Distribution Matching Distillation on a Gaussian teacher N(2, 0.5^2 I) in 4-D, whose 1-RF velocity is exact.
# (In 1-D the per-sample normaliser mean|x - x̂_real| is one number per sample and the run wanders.)


class GaussianFlow(nn.Module):
    """Exact 1-RF velocity of N(mean, std^2) data (learnable mean, log std); records the labels it sees."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(mean))
        self.log_std = nn.Parameter(torch.tensor(std).log())
        self.seen: set[int] = set()

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        self.seen |= set(label.tolist())
        t, var = expand_time(t, x), self.log_std.exp() ** 2
        return self.mean + (t * var - (1 - t)) / (t**2 * var + (1 - t) ** 2) * (x - t * self.mean)


class Affine(nn.Module):
    """Generator family v(z, t) = a z + b: one_step gives N((1 - EPS) b, (1 + (1 - EPS) a)^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return self.a * x + self.b

    def moments(self) -> tuple[float, float]:
        return (1 - EPS) * self.b.item(), abs(1 + (1 - EPS) * self.a.item())


MU, STD, DIM = 2.0, 0.5, 4


def _pairs(n: int, classes: int = 1) -> Batch:
    """Teacher pairs from the exact flow map x = mu + std z; labels cycle over `classes`."""
    z = torch.randn(n, DIM)
    return Batch(x=MU + STD * z, label=torch.arange(n) % classes, z=z)


def _dmd(**kwargs) -> tuple[Affine, torch.optim.Optimizer, DMDLoss]:
    teacher = GaussianFlow(MU, STD)
    generator = Affine()
    # DMD2's 5 fake updates per generator step: with 1 the fake net lags and the std oscillates.
    settings = {"fake_lr": 5e-2, "classes": [0], "regression_weight": 0.0, "fake_updates": 5} | kwargs
    return (
        generator,
        torch.optim.Adam(generator.parameters(), lr=1e-2),
        DMDLoss(teacher, copy.deepcopy(teacher), **settings),
    )


def _train(generator: nn.Module, optimizer: torch.optim.Optimizer, loss: DMDLoss, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        value = loss(generator, _pairs(256), step)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()


def _excess_flow_loss(fake: nn.Module, generator: Affine) -> float:
    """Fake net's RF loss on generator samples above that of the generator's exact flow (the minimum)."""
    mean, std = generator.moments()
    x, label = mean + std * torch.randn(4096, DIM), torch.zeros(4096, dtype=torch.long)
    values = []
    for net in (fake, GaussianFlow(mean, std)):
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(123)  # same t and noise for both, training's RNG stream untouched
            values.append(RectifiedFlowLoss()(net, Batch(x=x, label=label)).item())
    return values[0] - values[1]


def test_dmd_moves_the_generator_to_the_teacher_and_the_fake_net_tracks_it() -> None:
    torch.manual_seed(0)
    generator, optimizer, loss = _dmd()
    start_gap = abs(generator.moments()[0] - MU) + abs(generator.moments()[1] - STD)
    start_excess = _excess_flow_loss(loss.fake_net, generator)
    _train(generator, optimizer, loss, 300)
    mean, std = generator.moments()
    assert abs(mean - MU) + abs(std - STD) < 0.1 * start_gap, (mean, std)
    assert _excess_flow_loss(loss.fake_net, generator) < 0.1 * start_excess
    assert abs(loss.fake_net.mean.item() - mean) < 0.1 and abs(loss.fake_net.log_std.exp().item() - std) < 0.1
    assert set(loss.last_metrics) == {"dm_loss", "reg_loss", "fake_loss"}


def test_dmd_direction_vanishes_when_fake_equals_teacher() -> None:
    torch.manual_seed(0)
    _, _, loss = _dmd()
    x = torch.randn(64, DIM)
    assert torch.equal(loss.direction(x, torch.zeros(64, dtype=torch.long)), torch.zeros_like(x))


def test_dmd_fresh_noise_uses_own_classes_and_regression_uses_all_pairs() -> None:
    torch.manual_seed(0)
    generator, _, loss = _dmd(classes=[1, 2], regression_weight=0.25)
    loss.teacher.seen.clear()
    loss.fake_net.seen.clear()
    batch = _pairs(64, classes=4)
    loss(generator, batch)
    assert loss.teacher.seen == {1, 2} and loss.fake_net.seen == {1, 2}
    # The generator starts as the identity map, so its regression term on every pair is mean (z - x)^2.
    assert loss.last_metrics["reg_loss"].item() == pytest.approx((batch.z - batch.x).pow(2).mean().item())
    with pytest.raises(ValueError, match="batch.z"):
        loss(generator, Batch(x=batch.x, label=batch.label))


def test_dmd_resumes_exactly_from_its_state_dict() -> None:
    torch.manual_seed(0)
    generator, optimizer, loss = _dmd()
    _train(generator, optimizer, loss, 5)
    buffer = io.BytesIO()
    snapshot = {"gen": generator.state_dict(), "opt": optimizer.state_dict(), "loss": loss.state_dict()}
    torch.save(snapshot | {"rng": torch.get_rng_state()}, buffer)  # as the loop's checkpoint would
    _train(generator, optimizer, loss, 5, start=5)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, resumed_optimizer, resumed_loss = _dmd()
    resumed.load_state_dict(state["gen"])
    resumed_optimizer.load_state_dict(state["opt"])
    resumed_loss.load_state_dict(state["loss"])
    torch.set_rng_state(state["rng"])
    _train(resumed, resumed_optimizer, resumed_loss, 5, start=5)
    assert torch.equal(resumed.a, generator.a) and torch.equal(resumed.b, generator.b)
    assert torch.equal(resumed_loss.fake_net.mean, loss.fake_net.mean)


# DMD2's timesteps, DM direction on shifted Gaussians, GAN head and losses.


def test_karras_indices_map_to_the_rectified_flow_times_of_their_noise_levels() -> None:
    u = torch.tensor([0.0, 0.02, 0.5, 0.98, 1.0], dtype=torch.float64)
    t = karras_time(u)
    sigma = (80 ** (1 / 7) + u * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(t, 1 / (1 + sigma))
    assert t[1].item() == pytest.approx(0.0138, abs=1e-4) and t[3].item() == pytest.approx(0.9968, abs=1e-4)
    assert t[2].item() == pytest.approx(0.2845, abs=1e-3) and bool((t.diff() > 0).all())
    # A VE state x + sigma n, divided by 1 + sigma, is exactly the RF state at t = 1 / (1 + sigma).
    x, n = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close((x + sigma[:, None] * n) / (1 + sigma[:, None]), interpolate(x, n, t))


def _denoised(mean: float, std: float, x_t: Tensor, t: Tensor) -> Tensor:
    """E[x | x_t] for data N(mean, std^2 I): mean + t std^2 / (t^2 std^2 + (1 - t)^2) (x_t - t mean)."""
    t = expand_time(t, x_t)
    return mean + t * std**2 / (t**2 * std**2 + (1 - t) ** 2) * (x_t - t * mean)


@pytest.mark.parametrize("dm_time", ["karras", "uniform"])
def test_dm_direction_points_from_the_fake_towards_the_real_gaussian_exactly(dm_time: str) -> None:
    teacher, fake = GaussianFlow(MU, STD), GaussianFlow(MU - 1.0, STD)
    loss = DMDLoss(teacher, fake, 1e-3, [0], regression_weight=0.0, dm_time=dm_time)  # type: ignore[arg-type]
    x, label = MU + STD * torch.randn(256, DIM, dtype=torch.float64), torch.zeros(256, dtype=torch.long)
    torch.manual_seed(5)
    g = loss.direction(x, label)
    torch.manual_seed(5)  # the same timesteps and noise, by hand
    t = dm_times(256, dm_time, 0.02, 0.98, x)  # type: ignore[arg-type]
    x_t = interpolate(x, torch.randn_like(x), t)
    real, fake_x = _denoised(MU, STD, x_t, t), _denoised(MU - 1.0, STD, x_t, t)
    expected = (fake_x - real) / expand_time((x - real).abs().mean(1) + 1e-6, x)
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-6)
    assert bool((g < 0).all()), "fake mean below the real one: x - g moves every coordinate up, towards MU"


def test_discriminator_loss_is_minimised_by_the_log_density_ratio() -> None:
    """Real N(1, 1) vs fake N(-1, 1): the optimal logit is log p_real / p_fake = 2x."""
    torch.manual_seed(0)
    head = nn.Linear(1, 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-2)
    for _ in range(400):
        real, fake = 1 + torch.randn(4096, 1), -1 + torch.randn(4096, 1)
        value = discriminator_loss(head(real).squeeze(1), head(fake).squeeze(1))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert head.weight.item() == pytest.approx(2.0, abs=0.1) and head.bias.item() == pytest.approx(0.0, abs=0.1)


def test_generator_gan_loss_moves_the_fake_towards_the_real_under_the_optimal_discriminator() -> None:
    torch.manual_seed(0)
    shift = torch.tensor(-1.0, requires_grad=True)  # fake N(shift, 1) vs real N(1, 1): D*(x) = 2 x (shift = -1)
    fake = shift + torch.randn(8192)
    generator_gan_loss(2 * fake).backward()
    # d/dshift E softplus(-2 x) = -2 E sigmoid(-2 x) < 0: raising the fake mean lowers the loss.
    assert shift.grad.item() == pytest.approx(-2 * torch.sigmoid(-2 * fake.detach()).mean().item(), rel=1e-5)
    assert shift.grad.item() < -1.0


def test_feature_discriminator_reads_the_fake_nets_output_layer_input_and_nothing_else() -> None:
    torch.manual_seed(0)
    fake = build_net(TINY, (2,), 3)
    head = FeatureDiscriminator(fake, torch.zeros(1, 2), width=16)
    assert head.classifier[0].in_features == TINY.width
    assert not any(name.startswith("_fake") for name in head.state_dict()), "the head saves only itself"
    x, t, label = torch.randn(8, 2), torch.rand(8), torch.arange(8) % 3
    fake(x, t, label)
    assert head._features == [], "plain calls of the fake net keep no features"
    seen = []
    fake.layers[-1].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    logits = head.logits(x, t, label)
    torch.testing.assert_close(logits, head.classifier(seen[-1]).squeeze(1))
    assert logits.shape == (8,)


class PairBatches:
    """Endless Gaussian teacher pairs; batch k depends only on k, so resuming needs just the step."""

    def __init__(self) -> None:
        self.step = 0

    def __next__(self) -> Batch:
        z = torch.randn(32, DIM, generator=torch.Generator().manual_seed(self.step))
        self.step += 1
        return Batch(x=MU + STD * z, label=torch.zeros(32, dtype=torch.long), z=z)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


def _gan_dmd(gan_on: bool) -> tuple[nn.Module, DMDLoss]:
    torch.manual_seed(0)
    teacher = build_net(TINY, (DIM,), 1)
    data = Dataset(x=(MU + STD * torch.randn(512, DIM)).numpy(), labels=np.zeros(512, dtype=np.int64), num_classes=1)
    fake = copy.deepcopy(teacher)
    loss = DMDLoss(
        teacher, fake, 1e-3, [0], regression_weight=0.25, fake_updates=2,
        discriminator=FeatureDiscriminator(fake, torch.zeros(1, DIM), width=16), real=RandomBatches(data, 32, 1),
    )  # fmt: skip
    loss.gan_on = gan_on
    return build_net(TINY, (DIM,), 1), loss


def test_gan_phase_adds_both_adversarial_terms_and_trains_the_head() -> None:
    generator, loss = _gan_dmd(gan_on=False)
    before = copy.deepcopy(loss.discriminator.state_dict())
    loss(generator, _pairs(32))
    assert set(loss.last_metrics) == {"dm_loss", "reg_loss", "fake_loss"}
    assert all(torch.equal(v, loss.discriminator.state_dict()[k]) for k, v in before.items()), "head off: untouched"
    loss.gan_on = True
    value = loss(generator, _pairs(32))
    assert {"d_loss", "g_loss"} <= set(loss.last_metrics)
    assert not all(torch.equal(v, loss.discriminator.state_dict()[k]) for k, v in before.items())
    loss.fake_optimizer.zero_grad(set_to_none=True)  # what its own updates left behind
    value.backward()
    assert all(p.grad is None for p in loss.fake_net.parameters()), "the generator's loss leaves the fake net alone"


def test_killed_gan_phase_resumes_to_bit_identical_weights(tmp_path) -> None:
    settings = TrainSection(steps=8, batch_size=32, lr=1e-3, seed=0, checkpoint_every=2, log_every=4, amp=False)

    def run(stop_after: int | None, checkpoint) -> tuple[nn.Module, DMDLoss]:
        generator, loss = _gan_dmd(gan_on=True)
        result = train(generator, loss, PairBatches(), settings, checkpoint=checkpoint, stop_after=stop_after)
        return result.ema, loss

    clean_ema, clean_loss = run(None, None)
    run(4, tmp_path / "ckpt.pt")  # killed halfway
    resumed_ema, resumed_loss = run(None, tmp_path / "ckpt.pt")
    for a, b in [(clean_ema, resumed_ema), (clean_loss.fake_net, resumed_loss.fake_net),
                 (clean_loss.discriminator, resumed_loss.discriminator)]:  # fmt: skip
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert clean_loss.fake_optimizer.state_dict()["state"][0]["step"] == 8 * 2
