"""The seed paper's testbed: equal-mass three-body problem, the agent sets IAS15's `epsilon` per interval.

Initial conditions follow the free-fall setup of Breen et al. (2020) that the paper builds on (unconfirmed
which region it used): G = m = 1, all bodies at rest, x1 = (1, 0), x2 uniform in [-0.5, 0] x [0, 1] from a
per-episode seed, x3 = -x1 - x2 (centre of mass at rest at the origin). These collapse into close encounters,
where a fixed epsilon is either wasteful (before) or inaccurate (during).

Reward per interval k, with l_k = log10 of the relative energy error clipped to [log_err_floor, 0]:
    r_k = (l_{k-1} - l_k) - lam * (IAS15 steps in the interval)
so the return telescopes to l_0 - l_final - lam * total steps: final accuracy traded against cost in steps
(machine independent, unlike wall time). An interval that needs more than `max_steps_per_interval` steps is
stopped (a blown-up integration hardens into a tight binary and would stall) and, like an energy error >= 1,
ends the episode with l = 0, the worst value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import rebound

OBS_NAMES = (
    "log_r_min", "log_r_mid", "log_r_max",  # sorted pairwise distances (bodies are interchangeable)
    "log_v_min", "log_v_mid", "log_v_max",  # sorted speeds
    "log_energy_err", "time_frac", "log_steps_last",
)  # fmt: skip


@dataclass(frozen=True)
class ThreeBodyConfig:
    n_actions: int = 9
    eps_min: float = 1e-10  # IAS15 epsilon range (REBOUND's default is 1e-9)
    eps_max: float = 1e-2  # above ~1e-2 IAS15's corrector stops converging and steps saturate
    interval: float = 0.5  # N-body time between decisions
    n_intervals: int = 20
    lam: float = 1e-3  # reward cost per IAS15 step
    log_err_floor: float = -16.0
    max_steps_per_interval: int = 20_000

    def epsilons(self) -> np.ndarray:
        """(n_actions,) log-spaced epsilon values, smallest first."""
        return np.geomspace(self.eps_min, self.eps_max, self.n_actions)


def initial_positions(seed: int) -> np.ndarray:
    """(3, 3) positions of the free-fall initial condition drawn from `seed`."""
    rng = np.random.default_rng(seed)
    x2 = np.array([rng.uniform(-0.5, 0.0), rng.uniform(0.0, 1.0), 0.0])
    x1 = np.array([1.0, 0.0, 0.0])
    return np.stack([x1, x2, -x1 - x2])


def _set_epsilon(sim: rebound.Simulation, epsilon: float) -> None:
    if hasattr(sim, "ri_ias15"):  # REBOUND 4
        sim.ri_ias15.epsilon = epsilon
    else:  # REBOUND 5 keeps integrator settings on sim.integrator
        sim.integrator.epsilon = epsilon


def _log10(value: float, low: float, high: float) -> float:
    return min(max(math.log10(value), low), high) if value > 0 else low


class ThreeBodyEnv(gym.Env):
    """One episode = one initial condition over n_intervals; action = IAS15 epsilon for the next interval.

    reset(options={"ic_seed": s}) picks the initial condition; otherwise one is drawn from `ic_seeds`.
    """

    metadata = {"render_modes": []}
    obs_names = OBS_NAMES
    kind = "threebody"

    def __init__(
        self, config: ThreeBodyConfig = ThreeBodyConfig(), ic_seeds: Sequence[int] = range(1000)
    ) -> None:
        self.config, self.ic_seeds = config, list(ic_seeds)
        self.action_values = config.epsilons()
        self.action_space = gym.spaces.Discrete(config.n_actions)
        steps_high = math.log10(config.max_steps_per_interval) + 1
        low = [-8.0] * 6 + [config.log_err_floor, 0.0, 0.0]
        high = [4.0] * 6 + [0.0, 1.0, steps_high]
        self.observation_space = gym.spaces.Box(np.float32(low), np.float32(high), dtype=np.float32)
        self.sim: rebound.Simulation | None = None

    def _heartbeat(self, sim_pointer) -> None:
        """Called by REBOUND after every step: stop an interval that ran past its step budget."""
        sim = sim_pointer.contents
        if sim.steps_done > self._step_limit:
            sim.stop()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if options and "ic_seed" in options:
            ic_seed = int(options["ic_seed"])
        else:
            ic_seed = self.ic_seeds[int(self.np_random.integers(len(self.ic_seeds)))]
        sim = rebound.Simulation()
        sim.integrator = "ias15"
        for position in initial_positions(ic_seed):
            sim.add(m=1.0, x=position[0], y=position[1], z=position[2])
        sim.move_to_com()
        sim.heartbeat = self._heartbeat  # the simulation holds the ctypes wrapper
        self.sim, self._energy0 = sim, sim.energy()
        self._k, self._log_err, self._steps_last, self._step_limit = 0, self.config.log_err_floor, 0, 0
        return self._observe(), {"ic_seed": ic_seed}

    def _observe(self) -> np.ndarray:
        assert self.sim is not None
        p = self.sim.particles
        pos = np.array([p[i].xyz for i in range(3)])
        vel = np.array([p[i].vxyz for i in range(3)])
        dist = sorted(np.linalg.norm(pos[i] - pos[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
        speed = sorted(np.linalg.norm(vel, axis=1))
        values = [_log10(d, -8.0, 4.0) for d in dist] + [_log10(s, -8.0, 4.0) for s in speed]
        values += [self._log_err, self._k / self.config.n_intervals, math.log10(1 + self._steps_last)]
        space = self.observation_space
        return np.clip(np.array(values, dtype=np.float32), space.low, space.high)

    def relative_energy_error(self) -> float:
        assert self.sim is not None
        return abs((self.sim.energy() - self._energy0) / self._energy0)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.sim is None:
            raise RuntimeError("call reset() first")
        cfg, sim = self.config, self.sim
        epsilon = float(self.action_values[int(action)])
        _set_epsilon(sim, epsilon)
        start, target = sim.steps_done, (self._k + 1) * cfg.interval
        self._step_limit = start + cfg.max_steps_per_interval
        with warnings.catch_warnings():  # IAS15 warns when its corrector does not converge (large epsilon)
            warnings.simplefilter("ignore", RuntimeWarning)
            sim.integrate(target)
        self._k += 1
        self._steps_last = sim.steps_done - start
        stalled = sim.t < target - 1e-9 * cfg.interval
        error = self.relative_energy_error()
        log_err = 0.0 if stalled else _log10(error, cfg.log_err_floor, 0.0)
        reward = (self._log_err - log_err) - cfg.lam * self._steps_last
        self._log_err = log_err
        terminated = stalled or log_err >= 0.0 or self._k == cfg.n_intervals
        info = {
            "epsilon": epsilon, "steps": self._steps_last, "steps_total": sim.steps_done,
            "energy_error": error, "stalled": stalled,
        }  # fmt: skip
        return self._observe(), float(reward), terminated, False, info
