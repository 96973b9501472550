"""Per-student MSD objectives (docs/methods.md §5): Teacher Score Matching and DMD2 (DM + optional GAN head).

Both are loss objects `loss(net, batch, step)`. Pair terms use every class; fresh-noise terms only the
student's own classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.flow import (
    Batch,
    RectifiedFlowLoss,
    VelocityFn,
    denoise,
    expand_time,
    interpolate,
    one_step,
    sample_time,
)
from pipeline.runtime import average_gradients
from pipeline.slimflow import Distance, make_distance

# EDM's noise range and Karras' rho: the schedule DMD2 draws its DM timesteps from (as indices 2 %-98 %).
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.002, 80.0, 7.0
DMTime = Literal["karras", "uniform"]


def _freeze(net: nn.Module) -> nn.Module:
    return net.requires_grad_(False).eval()


def _class_tensor(classes: Sequence[int]) -> Tensor:
    if len(classes) == 0:
        raise ValueError("a student needs at least one class")
    return torch.as_tensor(list(classes), dtype=torch.long)


class TeacherScoreMatchingLoss:
    """TSM: E_t ||v_s(x_t, t) - v_T(x_t, t)||^2 on noised data x_t = t x + (1 - t) z, mean over dims.

    Only batch samples whose label is in `classes` (None: all) count; a batch with none gives a zero that
    is still connected to the net's parameters, so backward and AMP's grad checks keep working.
    """

    def __init__(self, teacher: VelocityFn, classes: Sequence[int] | None = None) -> None:
        self.teacher = _freeze(teacher) if isinstance(teacher, nn.Module) else teacher
        self.classes = None if classes is None else _class_tensor(classes)

    def __call__(self, net: nn.Module, batch: Batch, step: int = 0) -> Tensor:
        x, label = batch.x, batch.label
        if self.classes is not None:
            keep = torch.isin(label, self.classes.to(label.device))
            if not keep.any():
                return torch.stack([p.sum() for p in net.parameters()]).sum() * 0.0
            x, label = x[keep], label[keep]
        t = sample_time(x.shape[0], x.device).to(x.dtype)
        x_t = interpolate(x, torch.randn_like(x), t)
        with torch.no_grad():
            v_teacher = self.teacher(x_t, t, label)
        return F.mse_loss(net(x_t, t, label), v_teacher)


def karras_time(u: Tensor) -> Tensor:
    """Karras index fraction u in [0, 1] (0 = sigma_max) -> rectified-flow time of that noise level.

    sigma(u) = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, and a VE state x + sigma n
    is the RF state at t = 1 / (1 + sigma) scaled by 1 + sigma (docs/methods.md §8). DMD2's indices 2 %-98 %
    give t in [0.0138, 0.9968], median 0.2845.
    """
    hi, lo = KARRAS_SIGMA_MAX ** (1 / KARRAS_RHO), KARRAS_SIGMA_MIN ** (1 / KARRAS_RHO)
    sigma = (hi + u * (lo - hi)) ** KARRAS_RHO
    return 1 / (1 + sigma)


def dm_times(n: int, kind: DMTime, low: float, high: float, like: Tensor) -> Tensor:
    """(n,) DM timesteps: u ~ U(low, high) used as t (`uniform`) or as a Karras index fraction (`karras`)."""
    u = low + (high - low) * torch.rand(n, device=like.device, dtype=like.dtype)
    return karras_time(u) if kind == "karras" else u


def output_layer(net: nn.Module) -> nn.Module:
    """The net's last Linear/Conv layer — its output projection in every slimstep net (MLP, ResMLP, UNet)."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not layers:
        raise ValueError(f"{type(net).__name__} has no Linear or Conv2d layer to read GAN features from")
    return layers[-1]


class FeatureDiscriminator(nn.Module):
    """DMD2's GAN head: a small classifier on the fake net's features (the input of its output layer).

    `logits(x_t, t, label)` runs the fake net with a forward pre-hook that keeps those features, flattened,
    then Linear -> SiLU -> Linear -> one logit per sample.
    """

    def __init__(self, fake_net: nn.Module, example: Tensor, width: int = 256) -> None:
        super().__init__()
        self._fake = [fake_net]  # a list: the head must not register (or save) the fake net as its submodule
        self._features: list[Tensor] = []
        self._capturing = False  # the fake net's other calls (RF loss, DM direction) keep nothing
        output_layer(fake_net).register_forward_pre_hook(self._keep)
        one = example[:1]
        with torch.no_grad():
            dim = self._run(one, torch.full((1,), 0.5, dtype=one.dtype, device=one.device),
                            torch.zeros(1, dtype=torch.long, device=one.device)).shape[1]  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, 1))

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if self._capturing:
            self._features.append(inputs[0].flatten(1))

    def _run(self, x_t: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """The fake net's features (B, F) at (x_t, t, label)."""
        self._features.clear()
        self._capturing = True
        try:
            self._fake[0](x_t, t, label)
        finally:
            self._capturing = False
        return self._features.pop()

    def logits(self, x_t: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return self.classifier(self._run(x_t, t, label)).squeeze(1)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating GAN loss of the discriminator: softplus(-D(real)) + softplus(D(fake)), batch means."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_gan_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating GAN loss of the generator: softplus(-D(fake)) = -log sigmoid(D(G(z)))."""
    return F.softplus(-fake_logits).mean()


LearningRate = float | Callable[[int], float]


class DMDLoss:
    """DMD2 for a one-step generator G(z, c) = one_step(generator, z, c) (docs/methods.md §5).

    Each call: `fake_updates` steps of the fake net (its own Adam, LR `fake_lr` — a number or a function of
    the step — gradients clipped at `fake_grad_clip`), each on fresh detached generator samples with the
    rectified-flow loss; then, on new samples x = G(z, c), the generator loss 0.5 * mse(x, sg(x - g)) with
    g = (x̂_fake - x̂_real) / (mean|x - x̂_real| per sample + delta) at DM timesteps (`dm_time`, see dm_times), plus
    `regression_weight` * D(G(z_p, c_p), x_p) on the batch's pairs (all classes). Labels of fresh samples are
    uniform over `classes`. With a `discriminator` and `gan_on` set, the fake-net updates add
    `gan_d_weight` * the discriminator loss (noised `real` data vs noised generator samples, both at DM
    timesteps) and the generator adds `gan_g_weight` * its adversarial loss. The fake net should start as
    a copy of the teacher. state_dict() holds the fake net, the head, their optimiser and the real stream.
    """

    def __init__(
        self,
        teacher: nn.Module,
        fake_net: nn.Module,
        fake_lr: LearningRate,
        classes: Sequence[int],
        t_min: float = 0.02,
        t_max: float = 0.98,
        fake_updates: int = 5,
        regression_weight: float = 0.25,
        delta: float = 1e-6,
        distance: Distance = "l2",
        fake_betas: tuple[float, float] = (0.9, 0.999),
        fake_grad_clip: float = 10.0,
        dm_time: DMTime = "karras",
        discriminator: FeatureDiscriminator | None = None,
        real: Iterator[Batch] | None = None,
        gan_d_weight: float = 1e-2,
        gan_g_weight: float = 3e-3,
    ) -> None:
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if fake_updates < 1 or regression_weight < 0 or delta <= 0 or fake_grad_clip < 0:
            raise ValueError(
                f"need fake_updates >= 1, regression_weight >= 0, delta > 0, fake_grad_clip >= 0; got "
                f"{fake_updates}, {regression_weight}, {delta}, {fake_grad_clip}"
            )
        if (discriminator is None) != (real is None):
            raise ValueError("the GAN head needs both a discriminator and a stream of real batches")
        self.teacher = _freeze(teacher)
        self.fake_net = fake_net.requires_grad_(True)
        self.discriminator = discriminator
        groups = [{"params": list(fake_net.parameters())}]
        if discriminator is not None:
            groups.append({"params": list(discriminator.parameters())})
        self.fake_params = [p for group in groups for p in group["params"]]
        self.fake_lr = fake_lr
        self.fake_optimizer = torch.optim.Adam(groups, lr=self._fake_lr(0), betas=fake_betas)
        self.classes = _class_tensor(classes)
        self.t_min, self.t_max, self.dm_time, self.fake_updates = t_min, t_max, dm_time, fake_updates
        self.regression_weight, self.delta, self.fake_grad_clip = regression_weight, delta, fake_grad_clip
        self.real, self.gan_d_weight, self.gan_g_weight = real, gan_d_weight, gan_g_weight
        self.gan_on = False  # the stage switches the head on for the second phase
        self.distance = make_distance(distance)
        self.flow_loss = RectifiedFlowLoss()
        self.last_metrics: dict[str, Tensor] = {}  # detached 0-dim tensors: no device sync until logged

    def _fake_lr(self, step: int) -> float:
        return self.fake_lr(step) if callable(self.fake_lr) else self.fake_lr

    def _times(self, like: Tensor) -> Tensor:
        return dm_times(like.shape[0], self.dm_time, self.t_min, self.t_max, like)

    def _generate(self, generator: VelocityFn, like: Tensor) -> tuple[Tensor, Tensor]:
        """x = G(z, c) (B,*shape) for fresh noise and labels uniform over the student's classes."""
        label = self.classes.to(like.device)[torch.randint(len(self.classes), (like.shape[0],), device=like.device)]
        return one_step(generator, torch.randn_like(like), label), label

    def _gan_logits(self, x: Tensor, label: Tensor) -> Tensor:
        t = self._times(x)
        return self.discriminator.logits(interpolate(x, torch.randn_like(x), t), t, label)  # type: ignore[union-attr]

    def _update_fake(self, generator: VelocityFn, like: Tensor, step: int) -> dict[str, Tensor]:
        """Fit the fake flow (and the head) to fresh detached generator samples, `fake_updates` times."""
        self.fake_net.train()
        for group in self.fake_optimizer.param_groups:
            group["lr"] = self._fake_lr(step)
        gan = self.gan_on and self.discriminator is not None
        for _ in range(self.fake_updates):
            with torch.no_grad():
                x, label = self._generate(generator, like)
            flow = loss = self.flow_loss(self.fake_net, Batch(x=x, label=label))
            if gan:
                real = next(self.real)  # type: ignore[arg-type]
                d_loss = discriminator_loss(self._gan_logits(real.x, real.label), self._gan_logits(x, label))
                loss = loss + self.gan_d_weight * d_loss
            self.fake_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(self.fake_params)  # under DDP every rank's fake net takes the same step
            if self.fake_grad_clip > 0:
                nn.utils.clip_grad_norm_(self.fake_params, self.fake_grad_clip, foreach=True)
            self.fake_optimizer.step()
        metrics = {"fake_loss": flow.detach()}
        return metrics | ({"d_loss": d_loss.detach()} if gan else {})

    @torch.no_grad()
    def direction(self, x: Tensor, label: Tensor) -> Tensor:
        """Normalised distribution-matching direction g (B,*shape); x - g is closer to the teacher's data."""
        t = self._times(x)
        x_t = interpolate(x, torch.randn_like(x), t)
        self.fake_net.eval()
        x_real = denoise(x_t, t, self.teacher(x_t, t, label))
        x_fake = denoise(x_t, t, self.fake_net(x_t, t, label))
        scale = (x - x_real).abs().flatten(1).mean(1) + self.delta
        return (x_fake - x_real) / expand_time(scale, x)

    def __call__(self, generator: VelocityFn, batch: Batch, step: int = 0) -> Tensor:
        metrics = self._update_fake(generator, batch.x, step)
        x, label = self._generate(generator, batch.x)
        g = self.direction(x.detach(), label)
        loss = dm_loss = 0.5 * F.mse_loss(x, (x - g).detach())
        if self.gan_on and self.discriminator is not None:
            self.fake_net.requires_grad_(False)  # the adversarial gradient reaches the generator only
            g_loss = generator_gan_loss(self._gan_logits(x, label))
            self.fake_net.requires_grad_(True)
            loss = loss + self.gan_g_weight * g_loss
            metrics["g_loss"] = g_loss.detach()
        reg_loss = torch.zeros((), device=x.device)
        if self.regression_weight > 0:
            if batch.z is None:
                raise ValueError("DMD's regression term needs paired batches (batch.z); or regression_weight=0")
            reg_loss = self.distance(one_step(generator, batch.z, batch.label), batch.x)
            loss = loss + self.regression_weight * reg_loss
        self.last_metrics = {"dm_loss": dm_loss.detach(), "reg_loss": reg_loss.detach(), **metrics}
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = {"fake_net": self.fake_net.state_dict(), "fake_optimizer": self.fake_optimizer.state_dict()}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["real"] = self.real.state_dict()  # type: ignore[union-attr]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fake_net.load_state_dict(state["fake_net"])
        self.fake_optimizer.load_state_dict(state["fake_optimizer"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.real.load_state_dict(state["real"])  # type: ignore[union-attr]
