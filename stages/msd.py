"""Stage `msd@<k>`: student k of K, a one-step student serving its own group of classes (docs/methods.md §5).

The groups come from `msd.partition` (`kmeans` clusters the training set's mean image per class). The
student starts from the annealed student's raw weights when it has the same net (else random init);
`msd.tsm_steps > 0` first regresses it onto the teacher's velocity (TSM) on its own classes' real data, as
a run with its own checkpoint. Then `fgd`: Flow-Guided Distillation with the `distill` section's guide and
settings, or `dmd`: distribution matching against the teacher, the fake net a teacher copy, L2 regression
on pairs. Pair terms see every pair; fresh-noise terms only the student's classes (the losses do this).
"""

import copy
from pathlib import Path

import torch

from pipeline.app.stage import Stage, stage
from pipeline.data import RandomBatches, class_means, load_split, of_classes
from pipeline.modelio import RAW_WEIGHTS, load_model, save_model
from pipeline.msd import DMDLoss, TeacherScoreMatchingLoss, partition_classes
from pipeline.nets import build_net, count_macs, count_params
from pipeline.pairs import PairStream
from pipeline.slimflow import FlowGuidedDistillationLoss

DATA, TEACHER, ANNEALED = Path("data"), Path("models/teacher"), Path("models/anneal@slimflow")
# The `distill` keys an `fgd` student uses (its guide); dvc.yaml lists exactly these for msd@*.
GUIDE_KEYS = {"guide", "guide_steps", "s_min", "s_max", "distance", "huber_c", "lpips_weights", "guidance_weight"}


def objective(s: Stage, teacher: torch.nn.Module, classes: list[int]) -> FlowGuidedDistillationLoss | DMDLoss:
    p, d = s.params.msd, s.params.distill
    if p.objective == "dmd":
        return DMDLoss(
            teacher, copy.deepcopy(teacher), p.fake_lr, classes, t_min=p.t_min, t_max=p.t_max,
            fake_updates=p.fake_updates, regression_weight=p.regression_weight,
        )  # fmt: skip
    guide = load_model(ANNEALED, s.device).net if d.guide == "anneal" else teacher
    return FlowGuidedDistillationLoss(
        guide, classes=classes, s_min=d.s_min, s_max=d.s_max, distance=d.distance, guidance_weight=d.guidance_weight,
        guide_steps=d.guide_steps, huber_c=d.huber_c, lpips_weights=d.lpips_weights,
    )  # fmt: skip


def main(student: str) -> None:
    k = int(student)
    with stage(f"msd@{k}", ["msd", "distill", "anneal", "pairs"]) as s:
        p, a, pairs = s.params.msd, s.params.anneal, Path("pairs") / s.params.distill.pair_set  # as distill@fgd
        train, teacher = load_split(DATA).train, load_model(TEACHER, s.device).net
        shape, num_classes, spec = train.shape, train.num_classes, p.net or a.net
        groups = partition_classes(num_classes, len(p.students), p.partition, class_means(train), p.partition_seed)
        torch.manual_seed(p.seed)
        net = build_net(spec, shape, num_classes).to(s.device)
        if spec == a.net:
            net.load_state_dict(torch.load(ANNEALED / RAW_WEIGHTS, map_location=s.device, weights_only=True))
        key, inputs, metrics = {"classes": groups[k], "msd": p.model_dump()}, [DATA, TEACHER, ANNEALED], {}
        if p.tsm_steps:
            tsm = p.model_copy(update={"steps": p.tsm_steps})
            batches = RandomBatches(of_classes(train, groups[k]), tsm.batch_size, tsm.seed, s.device)
            result = s.train(net, TeacherScoreMatchingLoss(teacher, groups[k]), batches, tsm, {"tsm": key}, inputs)
            metrics["tsm_final_loss"] = sum(result.losses[-100:]) / len(result.losses[-100:])
        batches = PairStream(pairs, p.batch_size, p.seed, s.device)
        section = {"distill": s.params.distill.model_dump(include=GUIDE_KEYS), **key}
        result = s.train(net, objective(s, teacher, groups[k]), batches, p, section, [*inputs, pairs])
        s.log_samples(result.ema, list(shape), num_classes, classes=list(groups[k]))
        save_model(Path(f"models/msd/{k}"), result.ema.cpu(), {
            "stage": f"msd@{k}", "kind": "onestep", "net": spec.model_dump(), "data_shape": list(shape),
            "num_classes": num_classes, "classes": groups[k], "partition": p.partition, "objective": p.objective,
        })  # fmt: skip
        s.write_metrics({
            **metrics, "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:]), "classes": groups[k],
            "params": count_params(net), "macs": count_macs(net, shape, num_classes),
        })  # fmt: skip
