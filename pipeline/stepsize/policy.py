"""A DQN step-size policy: trained with stable-baselines3, kept as a plain torch MLP + JSON spec.

SB3's own `.save/.load` pickle the whole agent; ours stores only the Q-network's state dict (loaded with
`weights_only=True`) and a JSON spec that says how to rebuild and feed it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from pipeline.atomic import atomic_torch_save, atomic_write_text
from pipeline.flow import SampleResult, VelocityFn
from pipeline.stepsize.env import OBS_NAMES, StepperConfig, controlled_solve

FORMAT_VERSION = 1
WEIGHTS, SPEC = "policy.pt", "policy.json"
T = TypeVar("T")


@dataclass
class PolicySpec:
    """What a loader needs: observation layout, action values, net sizes, the env config it was trained on."""

    obs_names: list[str]
    actions: list[float]  # value of each action index (step fraction, IAS15 epsilon, ...)
    net_arch: list[int]
    env_kind: str  # "ode" | "threebody"
    env_config: dict[str, Any]
    activation: str = "relu"  # SB3's DQN MlpPolicy default
    train: dict[str, Any] = field(default_factory=dict)  # seed, timesteps, DQN settings (a record)
    format_version: int = FORMAT_VERSION


def from_known_fields(cls: type[T], data: dict[str, Any]) -> T:
    """Dataclass `cls` from saved metadata of any version: unknown keys dropped, missing ones defaulted."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def build_q_net(n_obs: int, n_actions: int, net_arch: Sequence[int]) -> nn.Sequential:
    """Same layout as SB3's QNetwork.q_net (Linear, ReLU, ..., Linear), so its state dict loads as is."""
    layers: list[nn.Module] = []
    width = n_obs
    for hidden in net_arch:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, n_actions))
    return nn.Sequential(*layers)


class StepPolicy:
    """Greedy DQN policy: action = argmax_a Q(obs, a)."""

    def __init__(self, spec: PolicySpec, state_dict: dict[str, Tensor] | None = None) -> None:
        self.spec = spec
        self.q_net = build_q_net(len(spec.obs_names), len(spec.actions), spec.net_arch).eval()
        if state_dict is not None:
            self.q_net.load_state_dict(state_dict)

    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> Tensor:
        """(n_actions,) Q-values of one observation (n_obs,)."""
        return self.q_net(torch.as_tensor(obs, dtype=torch.float32)[None])[0]

    def act(self, obs: np.ndarray) -> int:
        return int(self.q_values(obs).argmax())

    @property
    def config(self) -> StepperConfig:
        """The ODE env config this policy was trained with (ODE policies only)."""
        if self.spec.env_kind != "ode":
            raise ValueError(f"a {self.spec.env_kind!r} policy has no ODE stepper config")
        return from_known_fields(StepperConfig, self.spec.env_config)

    def save(self, directory: Path | str) -> None:
        """Write policy.pt (state dict) and policy.json (spec), each atomically."""
        directory = Path(directory)
        atomic_torch_save(self.q_net.state_dict(), directory / WEIGHTS)
        atomic_write_text(directory / SPEC, json.dumps(asdict(self.spec), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path | str) -> StepPolicy:
        """Rebuild from a saved folder without unpickling anything but tensors."""
        directory = Path(directory)
        spec = from_known_fields(PolicySpec, json.loads((directory / SPEC).read_text()))
        if spec.format_version > FORMAT_VERSION:
            raise ValueError(
                f"policy format {spec.format_version} is newer than this code ({FORMAT_VERSION})"
            )
        state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
        return cls(spec, state)


DQN_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "buffer_size": 20_000,
    "learning_starts": 100,
    "batch_size": 64,
    "gamma": 1.0,  # finite episodes with a terminal/telescoping reward: discounting would favour ending early
    "train_freq": 4,
    "target_update_interval": 200,
    "exploration_fraction": 0.3,
    "exploration_final_eps": 0.05,
}


def train_policy(
    env: gym.Env, total_timesteps: int, seed: int, net_arch: Sequence[int] = (64, 64), **dqn_kwargs: Any
) -> StepPolicy:
    """Train SB3 DQN (MlpPolicy) on `env` and copy its Q-network out; `dqn_kwargs` override DQN_DEFAULTS.

    `env` must carry `obs_names`, `action_values`, `kind` and a dataclass `config` (ODEStepEnv, ThreeBodyEnv).
    """
    from stable_baselines3 import DQN  # heavy import, only where training happens
    from stable_baselines3.common.logger import Logger

    settings = {**DQN_DEFAULTS, **dqn_kwargs}
    base = env.unwrapped  # the attributes below live on the env itself, not on wrappers
    model = DQN(
        "MlpPolicy",
        env,
        policy_kwargs={"net_arch": list(net_arch)},
        seed=seed,
        device="cpu",
        verbose=0,
        **settings,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default logger leaves an SB3-* dir in /tmp
    model.learn(total_timesteps=total_timesteps)
    spec = PolicySpec(
        obs_names=list(base.obs_names),
        actions=[float(a) for a in base.action_values],
        net_arch=list(net_arch),
        env_kind=base.kind,
        env_config=asdict(base.config),
        train={"seed": seed, "total_timesteps": total_timesteps, **settings},
    )
    state = {k: v.detach().cpu().clone() for k, v in model.q_net.q_net.state_dict().items()}
    return StepPolicy(spec, state)


def rl_solve(
    policy: StepPolicy, v: VelocityFn, z: Tensor, label: Tensor, config: StepperConfig | None = None
) -> SampleResult:
    """Integrate noise z (B,*shape) from eps to t_end with the policy's step sizes; a pair solver.

    `config` overrides the trained one (another t_end or NFE cap); its action set must match the policy's.
    """
    if policy.spec.obs_names != list(OBS_NAMES):
        raise ValueError(
            f"the policy observes {policy.spec.obs_names} but this code's stepper gives {list(OBS_NAMES)}: "
            "retrain it (dvc repro stepper)"
        )
    config = config or policy.config
    if not np.allclose(config.step_sizes(), policy.spec.actions):
        raise ValueError("config's action set differs from the one the policy was trained on")
    return controlled_solve(policy.act, v, z, label, config)


def run_episode(
    env: gym.Env, act: Callable[[np.ndarray], int], options: dict | None = None
) -> tuple[float, dict]:
    """Roll one episode with `act`; returns (undiscounted return, last info)."""
    obs, info = env.reset(options=options)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(act(obs))
        total += reward
        done = terminated or truncated
    return total, info
