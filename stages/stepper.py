"""Stage `stepper`: train the RL step-size policy on the teacher ODE; NFE–error table against fixed solvers."""

from pathlib import Path

import torch

from pipeline.app.stage import stage
from pipeline.atomic import atomic_write_text
from pipeline.modelio import load_model
from pipeline.pairs import pair_noise
from pipeline.stepsize import ODEStepEnv, ReferenceCache, StepperConfig, pareto_table, train_policy

OUT, TABLE = Path("models/stepper"), Path("reports/stepper/pareto.csv")
EVAL_SEED_OFFSET = 7_919  # held-out noises never overlap the training ones


def noise_batch(
    seed: int, start: int, size: int, shape: tuple[int, ...], classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    z, label = pair_noise(seed, range(start, start + size), shape, list(range(classes)))
    return z.to(device), label.to(device)


def main() -> None:
    with stage("stepper", ["stepper"]) as s:
        p = s.params.stepper
        teacher = load_model("models/teacher", s.device)
        shape, classes = tuple(teacher.meta["data_shape"]), teacher.meta["num_classes"]
        config = StepperConfig(n_actions=p.n_actions, h_min=p.h_min, h_max=p.h_max, nfe_cap=p.nfe_cap, lam=p.lam,
                               err_scale=p.err_scale, warp=p.warp)  # fmt: skip
        noise = [noise_batch(p.seed, b * p.batch_size, p.batch_size, shape, classes, s.device)
                 for b in range(p.noise_batches)]  # fmt: skip
        torch.manual_seed(p.seed)
        env = ODEStepEnv(teacher.net, noise, config)
        policy = train_policy(env, p.total_timesteps, p.seed, net_arch=p.net_arch, learning_rate=p.learning_rate)
        policy.save(OUT)

        z, label = noise_batch(p.seed + EVAL_SEED_OFFSET, 0, p.eval_batch, shape, classes, s.device)
        x_ref = ReferenceCache(teacher.net, tol=config.ref_tol)(z, label)
        table = pareto_table(teacher.net, z, label, x_ref, config.warp, policy)
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(TABLE, table.to_csv(index=False))
        rows = {f"{r.solver}-{r.setting}": {"nfe": float(r.nfe), "err": float(r.err)} for r in table.itertuples()}
        rl = next(value for key, value in rows.items() if key.startswith("rl-"))
        s.write_metrics({"rl": rl, "dopri5_1e-05": rows["dopri5-1e-05"], "dopri5_0.001": rows["dopri5-0.001"],
                         "table": rows})  # fmt: skip
