"""NFE–error comparison of fixed solvers and the RL policy on the same noise (the `stepper` stage's table)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pandas as pd
from torch import Tensor

from pipeline.flow import EPS, VelocityFn, dopri5, euler, heun
from pipeline.stepsize.env import pair_rmse
from pipeline.stepsize.policy import StepPolicy, rl_solve

COLUMNS = ["solver", "setting", "nfe", "err"]


def pareto_table(
    v: VelocityFn,
    z: Tensor,
    label: Tensor,
    x_ref: Tensor,
    warp: float,
    policy: StepPolicy | None = None,
    euler_steps: Sequence[int] = (1, 2, 4, 8, 16, 32),
    heun_steps: Sequence[int] = (1, 2, 4, 8, 16, 32),
    tols: Sequence[float] = (1e-2, 1e-3, 1e-4, 1e-5),
    warped_heun_steps: Sequence[int] = (4, 8, 16, 32),
    eps: float = EPS,
    t_end: float = 1.0,
) -> pd.DataFrame:
    """Rows (solver, setting, nfe, err) for Euler N, Heun N, dopri5 at rtol = atol = tol, the policy "rl",
    and Heun N on the end-packed grid `warp` ("heun-w2"): the fixed schedule an adaptive controller must beat.

    z (B,*shape) and label (B,) are one solve batch, x_ref (B,*shape) its reference; nfe is per batch solve
    and err = pair_rmse(x, x_ref). The policy solves with its trained config, moved to this eps and t_end.
    """
    rows = []
    for n in euler_steps:
        rows.append(("euler", str(n), euler(v, z, label, n, eps, t_end)))
    for n in heun_steps:
        rows.append(("heun", str(n), heun(v, z, label, n, eps, t_end)))
    for n in warped_heun_steps:
        rows.append((f"heun-w{warp:g}", str(n), heun(v, z, label, n, eps, t_end, warp)))
    for tol in tols:
        rows.append(("dopri5", f"{tol:g}", dopri5(v, z, label, rtol=tol, atol=tol, eps=eps, t_end=t_end)))
    if policy is not None:
        config = replace(policy.config, eps=eps, t_end=t_end)
        rows.append(("rl", f"cap{config.nfe_cap}", rl_solve(policy, v, z, label, config)))
    return pd.DataFrame(
        [(solver, setting, result.nfe, pair_rmse(result.x, x_ref)) for solver, setting, result in rows],
        columns=COLUMNS,
    )
