"""RL adaptive time-stepping (ALGORITHMS §6): ODE env on the teacher's flow, DQN policy, three-body env."""

from pipeline.stepsize.env import (
    OBS_NAMES,
    ODEStepEnv,
    ReferenceCache,
    SteppedHeun,
    StepperConfig,
    controlled_solve,
    pair_rmse,
)
from pipeline.stepsize.pareto import pareto_table
from pipeline.stepsize.policy import PolicySpec, StepPolicy, rl_solve, run_episode, train_policy
from pipeline.stepsize.threebody import ThreeBodyConfig, ThreeBodyEnv, initial_positions

__all__ = [
    "OBS_NAMES",
    "ODEStepEnv",
    "PolicySpec",
    "ReferenceCache",
    "StepPolicy",
    "SteppedHeun",
    "StepperConfig",
    "ThreeBodyConfig",
    "ThreeBodyEnv",
    "controlled_solve",
    "initial_positions",
    "pair_rmse",
    "pareto_table",
    "rl_solve",
    "run_episode",
    "train_policy",
]
