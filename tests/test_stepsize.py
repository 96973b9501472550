"""RL step-size controller: env contracts, agreement with flow.heun, NFE counting, caching, save/load."""

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch import Tensor

from pipeline import flow
from pipeline.flow import EPS, ExactVelocity
from pipeline.stepsize import (
    ODEStepEnv,
    PolicySpec,
    ReferenceCache,
    StepperConfig,
    StepPolicy,
    controlled_solve,
    pair_rmse,
    pareto_table,
    rl_solve,
    run_episode,
    train_policy,
)
from pipeline.stepsize.threebody import ThreeBodyConfig, ThreeBodyEnv

MU, S = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.3


def sigma(t: Tensor | float) -> Tensor | float:
    """Std of x_t for data N(MU, S^2 I): sqrt(t^2 S^2 + (1 - t)^2)."""
    return (t**2 * S**2 + (1 - t) ** 2) ** 0.5


def gaussian_v(x: Tensor, t: Tensor, label: Tensor) -> Tensor:
    """Exact 1-RF velocity of N(MU, S^2 I) data (docs/methods.md §1): d/dt of x_t = t MU + sigma_t z."""
    t = flow.expand_time(t, x)
    return MU + (t * S**2 - (1 - t)) / sigma(t) ** 2 * (x - t * MU)


def gaussian_map(z: Tensor) -> Tensor:
    """Exact solution at t = 1 from state z at t = EPS (the flow map is affine)."""
    return MU + sigma(1.0) / sigma(EPS) * (z - EPS * MU)


class Counted:
    """Counts network calls (one call = one batch evaluation)."""

    def __init__(self, v: flow.VelocityFn) -> None:
        self.v, self.calls = v, 0

    def __call__(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        self.calls += 1
        return self.v(x, t, label)


def noise(batches: int = 2, size: int = 16, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, generator=gen, dtype=torch.float64), torch.zeros(size, dtype=torch.long))
        for _ in range(batches)
    ]


BASE = StepperConfig(n_actions=6, h_min=1 / 32, h_max=1.0, nfe_cap=64, lam=0.01, err_scale=0.01, warp=1.0)
POW2 = replace(BASE, n_actions=4, h_min=1 / 8)  # actions h = 1/8, 1/4, 1/2, 1


def test_check_env_ode_gaussian() -> None:
    gym_check_env(ODEStepEnv(gaussian_v, noise(), BASE), skip_render_check=True)
    sb3_check_env(ODEStepEnv(gaussian_v, noise(), BASE), warn=True)


def test_check_env_ode_finite_data_oracle() -> None:
    """ExactVelocity is singular at t = 1: the env (and its reference) integrate to t_end < 1."""
    data = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    v = ExactVelocity(data, torch.arange(5) % 2)
    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    env = ODEStepEnv(v, [(z, torch.tensor([0, 1, 0, 1]))], replace(BASE, t_end=0.99, ref_tol=1e-5))
    gym_check_env(env, skip_render_check=True)
    _, info = run_episode(env, lambda obs: 2)
    assert np.isfinite(info["err"])


def test_check_env_threebody() -> None:
    config = ThreeBodyConfig(interval=0.1, n_intervals=3)
    gym_check_env(ThreeBodyEnv(config, ic_seeds=range(4)), skip_render_check=True)
    sb3_check_env(ThreeBodyEnv(config, ic_seeds=range(4)), warn=True)


@pytest.mark.parametrize("warp", [1.0, 2.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_constant_step_reproduces_flow_heun(n: int, warp: float) -> None:
    """h = 1/N every step = flow.heun(N, warp): Heun steps, the last one Euler, NFE 2N - 1 counted exactly."""
    v, config = Counted(gaussian_v), replace(POW2, warp=warp)
    env = ODEStepEnv(v, noise(1), config, reference=ReferenceCache(gaussian_v))
    action = int(np.argmin(np.abs(env.action_values - 1 / n)))
    _, info = run_episode(env, lambda obs: action)
    expected = flow.heun(gaussian_v, *noise(1)[0], steps=n, warp=warp)
    assert env.solution.nfe == info["nfe"] == v.calls == expected.nfe == 2 * n - 1
    torch.testing.assert_close(env.solution.x, expected.x, rtol=0, atol=1e-12)
    assert not info["capped"]
    solved = controlled_solve(lambda obs: action, gaussian_v, *noise(1)[0], config)
    torch.testing.assert_close(solved.x, env.solution.x, rtol=0, atol=0)


def test_mixed_steps_land_on_t_end_and_count_calls() -> None:
    """A step that overshoots is clipped onto t_end (Euler, no call); every Heun step costs 2 calls."""
    v = Counted(gaussian_v)
    env = ODEStepEnv(v, noise(1), POW2, reference=ReferenceCache(gaussian_v))
    env.reset(options={"index": 0})
    for action in (0, 1, 2):  # h = 1/8, 1/4, 1/2 -> t = 7/8 of the span, NFE 1 + 6
        obs, reward, terminated, _, _ = env.step(action)
        assert not terminated and reward == 0.0
    assert math.isclose(float(obs[0]), EPS + 7 / 8 * (1 - EPS), rel_tol=1e-6)
    assert math.isclose(float(obs[5]), math.log((1 - EPS) / 8), rel_tol=1e-5)  # log_rem = log(t_end - t)
    obs, reward, terminated, _, info = env.step(3)  # h = 1 clipped to the remaining 1/8
    assert terminated and obs[0] == 1.0 and info["nfe"] == v.calls == 7
    expected = -math.log(info["err"] / POW2.err_scale) - POW2.lam * 7
    assert reward == pytest.approx(expected)


def test_nfe_cap_forces_the_final_jump() -> None:
    config = replace(BASE, n_actions=4, h_min=1 / 64, h_max=1 / 8, nfe_cap=9, cap_penalty=0.5)
    v = Counted(gaussian_v)
    env = ODEStepEnv(v, noise(1), config, reference=ReferenceCache(gaussian_v))
    _, info = run_episode(env, lambda obs: 0)
    assert info["capped"] and info["nfe"] == v.calls == 9 and env.solution.nfe == 9
    assert info["t"] == 1.0


def test_reference_is_solved_once_per_noise_batch() -> None:
    v = Counted(gaussian_v)
    reference = ReferenceCache(v)
    env = ODEStepEnv(gaussian_v, noise(2), POW2, reference=reference)
    env.reset(seed=0)
    for _ in range(6):
        run_episode(env, lambda obs: 1)
    for index in (0, 1, 0):
        env.reset(options={"index": index})
    assert reference.solves == len(reference) == 2 and v.calls == reference.nfe
    z, label = noise(2)[1]
    reference(z.clone(), label.clone())  # equal content, new tensors: still a hit
    assert reference.solves == 2


def test_gaussian_errors_match_theory() -> None:
    """x_ref is the closed-form flow map; fixed schedules converge at order 1 (Euler) and 2 (Heun)."""
    z, label = noise(1, size=64)[0]
    x_ref = ReferenceCache(gaussian_v)(z, label)
    assert pair_rmse(x_ref, gaussian_map(z)) < 1e-6
    table = pareto_table(
        gaussian_v, z, label, gaussian_map(z), 2.0, euler_steps=(8, 16, 32), heun_steps=(8, 16, 32)
    )
    err = {(r.solver, int(r.setting)): r.err for r in table.itertuples() if r.solver != "dopri5"}
    for n in (8, 16):
        assert 1.7 < err["euler", n] / err["euler", 2 * n] < 2.3
        assert 3.4 < err["heun", n] / err["heun", 2 * n] < 4.6
    assert err["heun", 32] < 2e-3 and err["heun", 16] < err["euler", 32]  # NFE 31 beats NFE 32
    dopri = table[table.solver == "dopri5"]
    assert list(dopri.setting) == ["0.01", "0.001", "0.0001", "1e-05"] and dopri.err.iloc[-1] < 1e-4


def test_tiny_dqn_trains_saves_loads_and_solves(tmp_path) -> None:
    config = replace(BASE, nfe_cap=16)
    env = ODEStepEnv(gaussian_v, noise(2), config)
    policy = train_policy(env, total_timesteps=300, seed=0, net_arch=(16, 16), learning_starts=50)
    policy.save(tmp_path)
    spec = json.loads((tmp_path / "policy.json").read_text())
    assert spec["obs_names"] == list(env.obs_names) and spec["env_config"]["nfe_cap"] == 16
    loaded = StepPolicy.load(tmp_path)
    obs, _ = env.reset(seed=3)
    torch.testing.assert_close(loaded.q_values(obs), policy.q_values(obs), rtol=0, atol=0)
    z, label = noise(1, seed=5)[0]
    a, b = rl_solve(policy, gaussian_v, z, label), rl_solve(loaded, gaussian_v, z, label)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe <= config.nfe_cap
    table = pareto_table(
        gaussian_v, z, label, gaussian_map(z), 2.0, policy=loaded, euler_steps=(1,), heun_steps=(2,)
    )
    assert table.iloc[-1].solver == "rl" and table.iloc[-1].nfe == a.nfe


def test_policy_with_other_observations_is_refused() -> None:
    """A policy saved by older code (5 features, no log_rem) must fail loudly, not be fed a shifted vector."""
    config = replace(BASE, nfe_cap=16)
    old_names = ["t", "log_h", "log_err", "log_dv", "nfe_frac"]
    spec = PolicySpec(old_names, list(config.step_sizes()), [8], "ode", asdict(config))
    policy = StepPolicy(spec)
    with pytest.raises(ValueError, match="log_rem.*retrain"):
        rl_solve(policy, gaussian_v, *noise(1)[0])


def test_threebody_epsilon_trades_energy_error_for_steps() -> None:
    env = ThreeBodyEnv(ThreeBodyConfig(n_intervals=4), ic_seeds=[0])
    results = {}
    for action in (0, env.config.n_actions - 1):
        total, info = run_episode(env, lambda obs, a=action: a, options={"ic_seed": 0})
        results[action] = info
        assert np.isfinite(total) and info["steps_total"] > 0
    fine, coarse = results[0], results[env.config.n_actions - 1]
    assert fine["energy_error"] < coarse["energy_error"] and fine["steps_total"] > coarse["steps_total"]
