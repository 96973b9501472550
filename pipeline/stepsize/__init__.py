"""RL adaptive time-stepping (docs/methods.md §6): ODE env on the teacher's flow, DQN policy.

The three-body testbed (`pipeline.stepsize.threebody`, needs REBOUND) is imported on its own: the chain never uses it.
"""

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

__all__ = [
    "OBS_NAMES",
    "ODEStepEnv",
    "PolicySpec",
    "ReferenceCache",
    "StepPolicy",
    "SteppedHeun",
    "StepperConfig",
    "controlled_solve",
    "pair_rmse",
    "pareto_table",
    "rl_solve",
    "run_episode",
    "train_policy",
]
