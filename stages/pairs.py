"""Stage `pairs@<set>`: solve the EMA teacher's ODE (or, for a regenerated set, the annealed 2-flow
student's: `pairs.sets.<set>.flow`) from per-sample seeded noise into resumable shards.

Shards are written into scratch (DVC deletes a stage's outs before it runs, so a killed run resumes
from there) and moved into `pairs/<set>` only when every shard is complete.
"""

import os
import shutil
import sys
from pathlib import Path

from pipeline.app.stage import stage
from pipeline.errors import IntegrityError
from pipeline.modelio import load_model
from pipeline.pairs import PairStats, PairStoreMismatch, generate_pairs
from pipeline.stepsize import StepPolicy, rl_solve  # imported by every set, so each lists the same code deps


def rl_solver(policy_dir: str):  # noqa: ANN201 - a SolverFn
    policy = StepPolicy.load(Path(policy_dir))
    return lambda v, z, label: rl_solve(policy, v, z, label)


def main(name: str) -> None:
    with stage(f"pairs@{name}", ["pairs"]) as s:
        p, pair_set = s.params.pairs, s.params.pairs.sets[name]
        flow = load_model(pair_set.flow, s.device)
        inputs = [Path(pair_set.flow), Path(pair_set.policy)]
        request = {"set": name, **p.model_dump(exclude={"sets", "train_set"}), **pair_set.model_dump()}
        work = s.checkpoint(request, inputs)
        shards = work.parent / "shards"

        def generate() -> PairStats:
            return generate_pairs(
                flow.net, shards, p.n_pairs, p.shard_size, p.solve_batch, pair_set.solver, p.seed,
                tuple(flow.meta["data_shape"]), flow.meta["num_classes"], fp16=p.fp16,
                solver_fn=rl_solver(pair_set.policy) if pair_set.solver == "rl" else None, device=s.device,
            )  # fmt: skip

        try:
            stats = generate()
        except (PairStoreMismatch, IntegrityError) as exc:  # scratch is a cache: set the folder aside, start over
            bad = shards.with_name("shards.bad")
            shutil.rmtree(bad, ignore_errors=True)
            os.replace(shards, bad)
            print(f"warning: {exc}; set aside as {bad}, generating afresh", file=sys.stderr)
            stats = generate()
        out = Path("pairs") / name
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(shards, out)
        s.write_metrics({
            "n_pairs": stats.n_pairs, "nfe_per_batch_mean": stats.nfe_mean, "nfe_per_batch_max": stats.nfe_max,
            "pairs_per_s": stats.pairs_per_s or 0.0, "bytes_per_pair": stats.bytes_per_pair,
            "solve_batch": p.solve_batch, "solver": pair_set.solver, "flow": pair_set.flow,
        })  # fmt: skip
