"""The teacher's probability-flow ODE as an RL environment: the agent picks each Heun step (docs/methods.md §6).

Stepping rule (shared by the env and `controlled_solve`, so a policy sees the same features when deployed):
- the state at a decision is (x, t) with v(x, t) already evaluated: once at reset, then eagerly after a step;
- an action picks h from a log-spaced set as a fraction u of the solve, mapped to time by `flow.warp_time` with
  the config's `warp` (1: a fraction of [eps, t_end]; 2: steps packed toward t_end); h = 1/N is flow.heun's step;
- a step that reaches t_end (clipped to land on it exactly) is plain Euler with the velocity in hand: no call,
  and none at t_end, where the finite-data oracle is singular;
- any other step is Heun (1 call at the Euler predictor), then 1 call at the new point: 2 calls per step.
So a constant h = 1/N costs 1 + 2(N - 1) = 2N - 1 calls and reproduces `flow.heun(N, warp=warp)` step for step.

NFE cap: when another Heun step would exceed `nfe_cap`, the solve finishes at once with a free Euler jump to
t_end (using the velocity in hand). The episode then *terminates* (not truncates): its sample is complete and
its error honest, so DQN must not bootstrap past it; info `capped` says so, `cap_penalty` may add a cost.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from pipeline.flow import EPS, SampleResult, VelocityFn, dopri5, warp_time

OBS_NAMES = ("t", "log_h", "log_err", "log_dv", "nfe_frac", "log_rem")
LOG_MIN, LOG_MAX = -30.0, 10.0  # natural-log feature bounds (the Box the agent sees)


@dataclass(frozen=True)
class StepperConfig:
    """Everything that fixes the env's dynamics and reward; stored in a policy's spec.

    The first seven come from the params' `stepper` section (their defaults live in the schema only).
    """

    n_actions: int
    h_min: float  # smallest step, fraction of [eps, t_end]
    h_max: float  # largest step (1.0 = one Euler jump)
    nfe_cap: int  # hard budget of network calls per solve
    lam: float  # reward cost per network call
    err_scale: float  # err at which the accuracy term is zero
    warp: float  # time grid the actions step on (flow.warp_time); 1 = uniform in t
    cap_penalty: float = 0.0  # extra cost when the cap forced the final jump
    ref_tol: float = 1e-7  # dopri5 rtol = atol of the reference
    eps: float = EPS
    t_end: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.h_min <= self.h_max <= 1 or self.n_actions < 1:
            raise ValueError(f"need n_actions >= 1 and 0 < h_min <= h_max <= 1, got {self}")
        if self.warp < 1:
            raise ValueError(f"warp must be >= 1 (1 = uniform steps), got {self.warp}")
        if self.nfe_cap < 3:
            raise ValueError(f"nfe_cap must be >= 3 (one Heun step after the first call), got {self.nfe_cap}")

    def step_sizes(self) -> np.ndarray:
        """(n_actions,) log-spaced step fractions, smallest first."""
        return np.geomspace(self.h_min, self.h_max, self.n_actions)


def per_pair_rms(a: Tensor) -> float:
    """RMS over each pair's dimensions, mean over pairs, for a (B,*shape)."""
    return a.reshape(a.shape[0], -1).double().pow(2).mean(1).sqrt().mean().item()


def pair_rmse(x: Tensor, x_ref: Tensor) -> float:
    """err = RMSE(x, x_ref) per pair, mean over pairs (the §6 error), for x, x_ref (B,*shape)."""
    return per_pair_rms(x - x_ref)


def _log(value: float) -> float:
    return min(max(math.log(value), LOG_MIN), LOG_MAX) if value > 0 else LOG_MIN


class ReferenceCache:
    """x_ref = dopri5 at rtol = atol = `tol` from the same noise, solved once per (z, label) and kept.

    Keyed by a hash of the bytes, shape and dtype of z and label, so an equal batch given again (a new episode
    over the same noise) is a cache hit; `solves` and `nfe` count the reference work actually done.
    """

    def __init__(self, v: VelocityFn, tol: float = 1e-7, eps: float = EPS, t_end: float = 1.0) -> None:
        self.v, self.tol, self.eps, self.t_end = v, tol, eps, t_end
        self._store: dict[str, Tensor] = {}
        self.solves = 0
        self.nfe = 0

    @staticmethod
    def key(z: Tensor, label: Tensor) -> str:
        digest = hashlib.sha1()
        for tensor in (z, label):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def __call__(self, z: Tensor, label: Tensor) -> Tensor:
        """x_ref (B,*shape) for noise z (B,*shape) at t = eps and labels (B,)."""
        key = self.key(z, label)
        if key not in self._store:
            result = dopri5(self.v, z, label, rtol=self.tol, atol=self.tol, eps=self.eps, t_end=self.t_end)
            self._store[key] = result.x
            self.solves += 1
            self.nfe += result.nfe
        return self._store[key]

    def __len__(self) -> int:
        return len(self._store)


class SteppedHeun:
    """One batch solve from z at t = eps, advanced one chosen step at a time (the stepping rule above)."""

    def __init__(self, v: VelocityFn, z: Tensor, label: Tensor, config: StepperConfig) -> None:
        self.v, self.label, self.config = v, label, config
        self.x, self.t, self.u, self.nfe = z, config.eps, 0.0, 0  # u: fraction of the solve done
        self.done = self.capped = False
        self.log_h = self.log_err = self.log_dv = 0.0  # 0 until the first Heun step
        self.v_t = self._call(self.x, self.t)

    def _call(self, x: Tensor, t: float) -> Tensor:
        self.nfe += 1
        with torch.no_grad():
            return self.v(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), self.label)

    def features(self) -> np.ndarray:
        """float32 (6,) observation, named by OBS_NAMES; scalars only, never the image.

        log_rem = log(t_end - t) makes "close to the data end" a feature in its own right: the step that reaches
        t_end is Euler, and a policy keyed only on the local error estimate carries large final steps over to a
        straighter flow (the annealed student), where that last Euler step then dominates the error.
        """
        nfe_frac = self.nfe / self.config.nfe_cap
        log_rem = _log(self.config.t_end - self.t)
        return np.array([self.t, self.log_h, self.log_err, self.log_dv, nfe_frac, log_rem], dtype=np.float32)

    def _finish(self) -> None:
        self.x = self.x + (self.config.t_end - self.t) * self.v_t
        self.t, self.u, self.done = self.config.t_end, 1.0, True

    def advance(self, h: float) -> None:
        """Take one step of fraction h of the solve; the step reaching t_end is Euler, others are Heun."""
        if self.done:
            raise RuntimeError("the solve has reached t_end; start a new one")
        cfg, u1 = self.config, self.u + h
        if u1 >= 1 - 1e-9:
            self._finish()
            return
        t1 = warp_time(u1, cfg.warp, cfg.eps, cfg.t_end)
        dt = t1 - self.t
        v_pred = self._call(self.x + dt * self.v_t, t1)
        self.x = self.x + 0.5 * dt * (self.v_t + v_pred)
        v_new = self._call(self.x, t1)
        self.log_h = _log(dt)
        self.log_err = _log(per_pair_rms(0.5 * dt * (v_pred - self.v_t)))  # Heun - Euler: free error estimate
        self.log_dv = _log(per_pair_rms(v_new - self.v_t))  # velocity change along the path over the step
        self.v_t, self.t, self.u = v_new, t1, u1
        if self.nfe + 2 > self.config.nfe_cap:
            self.capped = True
            self._finish()

    @property
    def result(self) -> SampleResult:
        return SampleResult(self.x, self.nfe)


def observation_space() -> gym.spaces.Box:
    low = np.array([0.0, LOG_MIN, LOG_MIN, LOG_MIN, 0.0, LOG_MIN], dtype=np.float32)
    high = np.array([1.0, LOG_MAX, LOG_MAX, LOG_MAX, 1.0, LOG_MAX], dtype=np.float32)
    return gym.spaces.Box(low, high, dtype=np.float32)


def controlled_solve(
    act: Callable[[np.ndarray], int], v: VelocityFn, z: Tensor, label: Tensor, config: StepperConfig
) -> SampleResult:
    """Solve a whole batch z (B,*shape) with step sizes chosen by `act(features) -> action index`."""
    sizes = config.step_sizes()
    solve = SteppedHeun(v, z, label, config)
    while not solve.done:
        solve.advance(float(sizes[act(solve.features())]))
    return solve.result


class ODEStepEnv(gym.Env):
    """Each episode integrates one stored noise batch (z, label) from t = eps to t_end; one step per decision.

    Reward: 0 per step; at the end -log(err / err_scale) - lam * NFE (- cap_penalty if capped), with
    err = pair_rmse(x_final, x_ref). reset(options={"index": i}) picks batch i, otherwise one is drawn.
    """

    metadata = {"render_modes": []}
    obs_names = OBS_NAMES
    kind = "ode"

    def __init__(
        self,
        v: VelocityFn,
        noise: Sequence[tuple[Tensor, Tensor]],
        config: StepperConfig,
        reference: ReferenceCache | None = None,
    ) -> None:
        if not noise:
            raise ValueError("need at least one noise batch")
        self.v, self.noise, self.config = v, list(noise), config
        if reference is None:
            reference = ReferenceCache(v, config.ref_tol, config.eps, config.t_end)
        self.reference = reference
        self.action_values = config.step_sizes()
        self.action_space = gym.spaces.Discrete(config.n_actions)
        self.observation_space = observation_space()
        self._solve: SteppedHeun | None = None
        self._x_ref: Tensor | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if options and "index" in options:
            index = int(options["index"])
        else:
            index = int(self.np_random.integers(len(self.noise)))
        z, label = self.noise[index]
        self._x_ref = self.reference(z, label)
        self._solve = SteppedHeun(self.v, z, label, self.config)
        return self._solve.features(), {"index": index, "nfe": self._solve.nfe}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._solve is None or self._x_ref is None:
            raise RuntimeError("call reset() first")
        solve, cfg = self._solve, self.config
        solve.advance(float(self.action_values[int(action)]))
        info: dict = {"nfe": solve.nfe, "t": solve.t}
        reward = 0.0
        if solve.done:
            err = max(pair_rmse(solve.x, self._x_ref), 1e-12)
            reward = -math.log(err / cfg.err_scale) - cfg.lam * solve.nfe - cfg.cap_penalty * solve.capped
            info.update(err=err, capped=solve.capped)
        return solve.features(), float(reward), solve.done, False, info

    @property
    def solution(self) -> SampleResult:
        """The current episode's state (the final sample once terminated)."""
        if self._solve is None:
            raise RuntimeError("call reset() first")
        return self._solve.result
