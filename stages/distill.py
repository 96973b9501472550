"""Stage `distill@fgd` / `distill@naive-paper` / `distill@naive`: one-step students (docs/methods.md §4).

`fgd`: Flow-Guided Distillation from the annealed student's raw weights, guided by its EMA (or by the
teacher taking `guide_steps` Euler steps), on the pair set `distill.pair_set` (the teacher's, or one the
annealed student regenerated). The naive baseline — the same net from random init, pair term only, on the
train set's (teacher) pairs — in two readings: `naive-paper` as SlimFlow's ablation ran it (distillation's
recipe and `distill.steps` steps) and `naive`, the compute-matched reading under its long-standing leaderboard
name: SlimFlow's whole student budget (`anneal.steps + distill.steps` steps with annealing's lr and warm-up).
"""

import sys
from pathlib import Path

import torch

from pipeline.app.stage import stage
from pipeline.config import AnnealSection, DistillSection
from pipeline.modelio import RAW_WEIGHTS, fit_weights, load_model, load_weights, save_model
from pipeline.nets import build_net, count_macs, count_params
from pipeline.pairs import PairStream
from pipeline.slimflow import FlowGuidedDistillationLoss

ANNEALED = Path("models/anneal@slimflow")
VARIANTS = ("fgd", "naive-paper", "naive")


def recipe(variant: str, p: DistillSection, a: AnnealSection) -> DistillSection:
    """The training settings of a variant: distillation's, or for `naive` annealing + distillation's steps."""
    if variant == "naive":
        return p.model_copy(update={"steps": a.steps + p.steps, "lr": a.lr, "warmup_steps": a.warmup_steps})
    return p


def main(variant: str) -> None:
    if variant not in VARIANTS:
        print(f"error: unknown distill variant {variant!r}; allowed: {', '.join(VARIANTS)}", file=sys.stderr)
        raise SystemExit(2)
    with stage(f"distill@{variant}", ["distill", "anneal", "pairs"]) as s:
        p, a, fgd = s.params.distill, s.params.anneal, variant == "fgd"
        pairs = Path("pairs") / (p.pair_set if fgd else s.params.pairs.train_set)  # naive: the teacher's pairs
        teacher = load_model("models/teacher", s.device)
        shape, classes = tuple(teacher.meta["data_shape"]), teacher.meta["num_classes"]
        torch.manual_seed(p.seed)
        net = build_net(a.net, shape, classes).to(s.device)
        if fgd:
            fit_weights(net, load_weights(ANNEALED, RAW_WEIGHTS), ANNEALED / RAW_WEIGHTS)
            guide = load_model(ANNEALED, s.device).net if p.guide == "anneal" else teacher.net
            weight = p.guidance_weight
        else:
            guide, weight = None, 0.0
        settings = recipe(variant, p, a)
        loss = FlowGuidedDistillationLoss(
            guide, classes=range(classes), s_min=p.s_min, s_max=p.s_max, distance=p.distance, guidance_weight=weight,
            guide_steps=p.guide_steps, huber_c=p.huber_c, lpips_weights=p.lpips_weights,
        )  # fmt: skip
        batches = PairStream(pairs, settings.batch_size, settings.seed, s.device)
        inputs = [pairs, ANNEALED] if fgd else [pairs]
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
