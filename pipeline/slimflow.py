"""SlimFlow (docs/methods.md §3-§4): annealing reflow for a small 2-flow student, flow-guided distillation.

Both are loss objects `loss(net, batch, step)`; `batch.z`, `batch.x` are a stored (noise, teacher sample)
pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.flow import EPS, Batch, VelocityFn, denoise, expand_time, interpolate, one_step, sample_time

Schedule = Literal["linear", "exp", "cos", "constant"]
Distance = Literal["l2", "pseudo_huber", "lpips"]
DistanceFn = Callable[[Tensor, Tensor], Tensor]
SCHEDULES: tuple[str, ...] = ("linear", "exp", "cos", "constant")


# Annealing reflow (§3).


def beta(
    step: int,
    total_steps: int,
    schedule: Schedule = "linear",
    window_frac: float = 0.375,
    constant: float = 0.0,
) -> float:
    """Noise-mixing weight beta(k) in [0, 1] at optimiser step k, window W = window_frac * total_steps.

    linear 1 - min(1, k/W); exp exp(-k/W); cos (1 + cos(pi min(1, k/W)))/2; constant: `constant` for every k.
    beta = 1 is 1-RF training on teacher samples, beta = 0 is reflow.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if step < 0 or total_steps < 1:
        raise ValueError(f"need step >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
    if schedule == "constant":
        if not 0.0 <= constant <= 1.0:
            raise ValueError(f"constant beta must lie in [0, 1], got {constant}")
        return float(constant)
    if not window_frac > 0:
        raise ValueError(f"window_frac must be > 0 for schedule {schedule!r}, got {window_frac}")
    r = step / (window_frac * total_steps)
    if schedule == "linear":
        return 1.0 - min(1.0, r)
    if schedule == "exp":
        return math.exp(-r)
    return (1.0 + math.cos(math.pi * min(1.0, r))) / 2.0


def mix_noise(z_pair: Tensor, beta: float) -> Tensor:
    """z_beta = sqrt(1 - beta^2) z_pair + beta xi, xi ~ N(0, I) fresh (torch global RNG); (B,*shape).

    Still exactly N(0, I) when z_pair is. No random draw at beta = 0, so plain reflow keeps the RNG
    stream of `RectifiedFlowLoss`.
    """
    if beta == 0.0:
        return z_pair
    return math.sqrt(1.0 - beta**2) * z_pair + beta * torch.randn_like(z_pair)


class AnnealingReflowLoss:
    """Rectified-flow loss on (x_pair, z_beta) with beta annealed from 1 to 0; optional joint flip.

    schedule "constant" with beta_constant 0 is plain reflow (the `anneal@reflow` baseline).
    `flip` (images only, flip-symmetric data): with probability 1/2 per batch mirror x AND z along the
    last axis, which keeps them a valid teacher pair.
    """

    def __init__(
        self,
        total_steps: int,
        schedule: Schedule = "linear",
        window_frac: float = 0.375,
        flip: bool = False,
        beta_constant: float = 0.0,
    ) -> None:
        beta(0, total_steps, schedule, window_frac, beta_constant)  # validate once, before training starts
        self.total_steps, self.schedule, self.window_frac = total_steps, schedule, window_frac
        self.flip, self.beta_constant = flip, beta_constant
        self.last_metrics: dict[str, float] = {}

    def __call__(self, net: VelocityFn, batch: Batch, step: int = 0) -> Tensor:
        if batch.z is None:
            raise ValueError("AnnealingReflowLoss needs paired noise: batch.z is None")
        x, z = batch.x, batch.z
        if self.flip:
            if x.dim() != 4:
                raise ValueError(f"flip needs image batches (B,C,H,W), got shape {tuple(x.shape)}")
            if torch.rand(()) < 0.5:
                x, z = x.flip(-1), z.flip(-1)
        b = beta(step, self.total_steps, self.schedule, self.window_frac, self.beta_constant)
        z_beta = mix_noise(z, b)
        t = sample_time(x.shape[0], x.device).to(x.dtype)
        self.last_metrics = {"beta": b}
        return (net(interpolate(x, z_beta, t), t, batch.label) - (x - z_beta)).pow(2).mean()


# Distances D(a, b) for distillation: (B,*shape) x2 -> scalar, mean over the batch.


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Squared error, mean over dimensions per sample, then over the batch."""
    return (a - b).pow(2).flatten(1).mean(1).mean()


def huber_c_default(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 sqrt(D) for D dimensions per sample."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample (sum over dimensions), mean over the batch; c None: iCT's."""
    if c is None:
        c = huber_c_default(a[0].numel())
    return ((a - b).pow(2).flatten(1).sum(1) + c**2).sqrt().sub(c).mean()


class LpipsDistance:
    """LPIPS-VGG at `size` x `size` (the paper's D), from a user-supplied state dict; never downloads.

    `weights` holds the whole `lpips.LPIPS(net="vgg")` state dict (VGG trunk + linear heads), saved once where
    the weights are available, e.g. `torch.save(lpips.LPIPS(net="vgg").state_dict(), path)`. One-channel data
    are repeated to RGB; inputs are in [-1, 1] as LPIPS expects.
    """

    def __init__(self, weights: str | Path | None, size: int = 64) -> None:
        try:
            import lpips
        except ImportError as err:
            raise ImportError(
                "distance 'lpips' needs the optional package: pip install 'slimstep[lpips]'"
            ) from err
        if weights is None or not Path(weights).is_file():
            raise FileNotFoundError(
                f"distance 'lpips' needs a local LPIPS-VGG state dict, not found at {weights!s}; nothing is"
                " downloaded: save one with torch.save(lpips.LPIPS(net='vgg').state_dict(), PATH)"
            )
        model = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = model.eval().requires_grad_(False)
        self.size = size

    def _prepare(self, img: Tensor) -> Tensor:
        if img.dim() != 4:
            raise ValueError(f"LPIPS needs image batches (B,C,H,W), got shape {tuple(img.shape)}")
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)
        if img.shape[-1] != self.size or img.shape[-2] != self.size:
            img = nn.functional.interpolate(
                img, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
        return img

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        self.model.to(a.device)
        return self.model(self._prepare(a), self._prepare(b)).mean()


def make_distance(
    name: Distance, huber_c: float | None = None, lpips_weights: str | Path | None = None
) -> DistanceFn:
    """Name -> D(a, b); "pseudo_huber" uses `huber_c` (None: iCT's), "lpips" loads `lpips_weights`."""
    if name == "l2":
        return l2_distance
    if name == "pseudo_huber":
        return lambda a, b: pseudo_huber(a, b, huber_c)
    if name == "lpips":
        return LpipsDistance(lpips_weights)
    raise ValueError(f"unknown distance {name!r}; allowed: l2, pseudo_huber, lpips")


# Flow-guided distillation (§4).


def _guide_leg(guide: VelocityFn, x_s: Tensor, s: Tensor, label: Tensor, steps: int) -> Tensor:
    """Euler from per-sample times s (B,) to 1 in `steps` uniform steps: x_s (B,*shape) -> x_1."""
    h = (1 - s) / steps
    x, t = x_s, s
    for _ in range(steps):
        x = x + expand_time(h, x) * guide(x, t, label)
        t = t + h
    return x


class FlowGuidedDistillationLoss:
    """L = D(one_step(z_p), x_p) + w * D(one_step(z), x_2step) for a one-step student (docs/methods.md §4).

    Pair term on the stored pairs (every class). Guidance term on fresh noise z with labels uniform over
    `classes`: x_s = z + (s - eps) v_student(z, eps) with s ~ U(s_min, s_max) per sample, then the frozen
    guide from s to 1 in `guide_steps` Euler steps (1 = the paper's x_2step); the target carries no gradient.
    guidance_weight 0 is naive distillation (pair term only; the guide is never called).
    """

    def __init__(
        self,
        guide: VelocityFn | None,
        classes: Sequence[int],
        s_min: float = 0.2,
        s_max: float = 0.8,
        distance: Distance = "l2",
        guidance_weight: float = 1.0,
        guide_steps: int = 1,
        huber_c: float | None = None,
        lpips_weights: str | Path | None = None,
    ) -> None:
        if not EPS <= s_min <= s_max <= 1.0:
            raise ValueError(f"need {EPS} <= s_min <= s_max <= 1, got s_min={s_min}, s_max={s_max}")
        if guidance_weight < 0 or guide_steps < 1:
            raise ValueError(
                f"need guidance_weight >= 0 and guide_steps >= 1, got {guidance_weight}, {guide_steps}"
            )
        if guidance_weight > 0 and (guide is None or len(classes) == 0):
            raise ValueError(
                "the guidance term (guidance_weight > 0) needs a guide and a non-empty class list"
            )
        if isinstance(guide, nn.Module):
            guide.requires_grad_(False).eval()
        self.guide, self.classes = guide, torch.as_tensor(list(classes), dtype=torch.long)
        self.s_min, self.s_max = s_min, s_max
        self.guidance_weight, self.guide_steps = guidance_weight, guide_steps
        self.distance = make_distance(distance, huber_c, lpips_weights)
        self.last_metrics: dict[str, Tensor] = {}  # detached 0-dim tensors: no device sync until logged

    def target(self, v_student: Tensor, z: Tensor, label: Tensor) -> Tensor:
        """x_2step (B,*shape), no gradient, from the student's velocity v_student = v(z, eps) at noise z."""
        with torch.no_grad():
            s = torch.empty(z.shape[0], device=z.device, dtype=z.dtype).uniform_(self.s_min, self.s_max)
            x_s = z + expand_time(s - EPS, z) * v_student.detach()
            return _guide_leg(self.guide, x_s, s, label, self.guide_steps)  # type: ignore[arg-type]

    def __call__(self, net: VelocityFn, batch: Batch, step: int = 0) -> Tensor:
        if batch.z is None:
            raise ValueError("FlowGuidedDistillationLoss needs paired noise: batch.z is None")
        pair_loss = self.distance(one_step(net, batch.z, batch.label), batch.x)
        self.last_metrics = {"pair_loss": pair_loss.detach()}
        if self.guidance_weight == 0:
            return pair_loss
        z = torch.randn_like(batch.z)
        label = self.classes.to(z.device)[torch.randint(len(self.classes), (z.shape[0],), device=z.device)]
        t_eps = torch.full((z.shape[0],), EPS, dtype=z.dtype, device=z.device)
        v = net(z, t_eps, label)  # one forward serves both the prediction and the detached first step
        guide_loss = self.distance(denoise(z, t_eps, v), self.target(v, z, label))
        self.last_metrics["guide_loss"] = guide_loss.detach()
        return pair_loss + self.guidance_weight * guide_loss
