"""Stage `anneal@slimflow` / `anneal@reflow`: a small 2-flow student from random init on teacher pairs.

`slimflow` uses Annealing Reflow (beta schedule from params); `reflow` is the baseline the paper beats:
the same student, steps and pairs with beta = 0 (plain reflow).
"""

from pathlib import Path

import torch

from pipeline.app.stage import stage
from pipeline.modelio import RAW_WEIGHTS, read_meta, save_model
from pipeline.nets import build_net, count_macs, count_params
from pipeline.pairs import PairStream
from pipeline.slimflow import AnnealingReflowLoss


def main(variant: str) -> None:
    with stage(f"anneal@{variant}", ["anneal", "pairs"]) as s:
        p, pairs = s.params.anneal, Path("pairs") / s.params.pairs.train_set
        teacher = read_meta(Path("models/teacher"))
        shape, classes = tuple(teacher["data_shape"]), teacher["num_classes"]
        slim = variant == "slimflow"
        loss = AnnealingReflowLoss(
            total_steps=p.steps, schedule=p.schedule if slim else "constant", window_frac=p.window_frac,
            flip=p.flip, beta_constant=p.beta_constant if slim else 0.0,
        )  # fmt: skip
        torch.manual_seed(p.seed)
        net = build_net(p.net, shape, classes).to(s.device)
        batches = PairStream(pairs, p.batch_size, p.seed, s.device)
        result = s.train(net, loss, batches, p, {"variant": variant, **p.model_dump()}, [pairs])
        out = Path(f"models/anneal@{variant}")
        s.log_samples(result.ema, list(shape), classes, sampler="euler-4")
        save_model(out, result.ema.cpu(), {
            "stage": f"anneal@{variant}", "kind": "flow", "net": p.net.model_dump(), "data_shape": list(shape),
            "num_classes": classes, "default_sampler": "euler-4",
        }, extra={RAW_WEIGHTS: result.net.cpu().state_dict()})  # fmt: skip
        s.write_metrics({
            "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:]),
            "params": count_params(net), "macs": count_macs(net, shape, classes),
        })  # fmt: skip
