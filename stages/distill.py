"""Stage `distill@fgd` / `distill@naive`: one-step students (docs/methods.md §4).

`fgd`: Flow-Guided Distillation from the annealed student's raw weights, guided by its EMA (or by the
teacher taking `guide_steps` Euler steps), on the pair set `distill.pair_set` (the teacher's, or one the
annealed student regenerated). `naive`: the baseline — the same net from random init, pair
term only, trained with the from-scratch recipe for as many steps as annealing + distillation together.
"""

from pathlib import Path

import torch

from pipeline.app.stage import stage
from pipeline.modelio import RAW_WEIGHTS, load_model, save_model
from pipeline.nets import build_net, count_macs, count_params
from pipeline.pairs import PairStream
from pipeline.slimflow import FlowGuidedDistillationLoss

ANNEALED = Path("models/anneal@slimflow")


def main(variant: str) -> None:
    with stage(f"distill@{variant}", ["distill", "anneal", "pairs"]) as s:
        p, a = s.params.distill, s.params.anneal
        pairs = Path("pairs") / (p.pair_set if variant == "fgd" else s.params.pairs.train_set)  # naive: teacher pairs
        teacher = load_model("models/teacher", s.device)
        shape, classes = tuple(teacher.meta["data_shape"]), teacher.meta["num_classes"]
        torch.manual_seed(p.seed)
        net = build_net(a.net, shape, classes).to(s.device)
        if variant == "fgd":
            net.load_state_dict(torch.load(ANNEALED / RAW_WEIGHTS, map_location=s.device, weights_only=True))
            guide = load_model(ANNEALED, s.device).net if p.guide == "anneal" else teacher.net
            settings, weight = p, p.guidance_weight
        else:
            guide, weight = None, 0.0
            settings = p.model_copy(update={"steps": a.steps + p.steps, "lr": a.lr, "warmup_steps": a.warmup_steps})
        loss = FlowGuidedDistillationLoss(
            guide, classes=range(classes), s_min=p.s_min, s_max=p.s_max, distance=p.distance, guidance_weight=weight,
            guide_steps=p.guide_steps, huber_c=p.huber_c, lpips_weights=p.lpips_weights,
        )  # fmt: skip
        batches = PairStream(pairs, settings.batch_size, settings.seed, s.device)
        inputs = [pairs, ANNEALED] if variant == "fgd" else [pairs]
        result = s.train(net, loss, batches, settings, {"variant": variant, **settings.model_dump()}, inputs)
        s.log_samples(result.ema, list(shape), classes)
        save_model(Path(f"models/distill@{variant}"), result.ema.cpu(), {
            "stage": f"distill@{variant}", "kind": "onestep", "net": a.net.model_dump(), "data_shape": list(shape),
            "num_classes": classes, "steps": settings.steps,
        })  # fmt: skip
        s.write_metrics({
            "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:]), "steps": settings.steps,
            "params": count_params(net), "macs": count_macs(net, shape, classes),
        })  # fmt: skip
