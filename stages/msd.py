"""Stage `msd@<k>`: student k of K, a one-step student serving its own group of classes (docs/methods.md §5).

The groups come from `msd.partition` (`kmeans` clusters the training set's mean image per class).
`fgd`: the student starts from the annealed student's raw weights when it has the same net (else random
init) and is trained by Flow-Guided Distillation with the `distill` section's guide and settings.
`dmd` (DMD2): the student starts as a copy of the teacher when it has the teacher's net, else from random
init — then `msd.tsm_steps` of Teacher Score Matching are its warm start; the fake net is a teacher copy,
L2 regression on pairs, and `msd.gan_steps > 0` adds a second phase at `msd.gan_lr` with the GAN head on
the fake net's features and real data of the student's classes. TSM, the DM phase and the GAN phase are
runs with their own checkpoints. Pair terms see every pair; fresh-noise terms only the student's classes.
With the GAN phase on, the DM phase's EMA weights are kept beside the final ones (`before-gan.pt`), so what the
GAN phase adds can be measured on one training run (`load_weights(models/msd/<k>, BEFORE_GAN)`).
"""

import copy
import sys
from pathlib import Path

import torch

from pipeline.app.stage import Stage, stage
from pipeline.config import MsdSection
from pipeline.data import RandomBatches, class_means, load_split, of_classes
from pipeline.errors import UserError
from pipeline.modelio import RAW_WEIGHTS, fit_weights, load_model, load_weights, read_meta, save_model
from pipeline.msd import DMDLoss, FeatureDiscriminator, TeacherScoreMatchingLoss, partition_classes
from pipeline.nets import NetSpec, build_net, count_macs, count_params
from pipeline.pairs import PairStream
from pipeline.slimflow import FlowGuidedDistillationLoss
from pipeline.training import learning_rate

DATA, TEACHER, ANNEALED = Path("data"), Path("models/teacher"), Path("models/anneal@slimflow")
BEFORE_GAN = "before-gan.pt"
# The `distill` keys an `fgd` student uses (its guide); dvc.yaml lists exactly these for msd@*.
GUIDE_KEYS = {"guide", "guide_steps", "s_min", "s_max", "distance", "huber_c", "lpips_weights", "guidance_weight"}


def dmd_objective(s: Stage, teacher: torch.nn.Module, classes: list[int], real: RandomBatches) -> DMDLoss:
    """DMD2 with the fake net's LR following the generator's schedule, scaled by fake_lr / lr."""
    p = s.params.msd
    fake_net = copy.deepcopy(teacher)
    head = FeatureDiscriminator(fake_net, real.x[:1].to(s.device), p.gan_width).to(s.device) if p.gan_steps else None
    loss = DMDLoss(
        teacher, fake_net, 0.0, classes, t_min=p.t_min, t_max=p.t_max, fake_updates=p.fake_updates,
        regression_weight=p.regression_weight, fake_grad_clip=p.fake_grad_clip, dm_time=p.dm_time,
        discriminator=head, real=real if head else None, gan_d_weight=p.gan_d_weight, gan_g_weight=p.gan_g_weight,
    )  # fmt: skip
    follow_generator(loss, p)
    return loss


def follow_generator(loss: DMDLoss, settings: MsdSection) -> None:
    """Fake-net LR at each step: the generator's under `settings` times fake_lr / lr (DMD2: equal, ratio 1)."""
    ratio = (settings.fake_lr or settings.lr) / settings.lr
    loss.fake_lr = lambda step: ratio * learning_rate(step, settings)


def fgd_objective(s: Stage, teacher: torch.nn.Module, classes: list[int]) -> FlowGuidedDistillationLoss:
    d = s.params.distill
    guide = load_model(ANNEALED, s.device).net if d.guide == "anneal" else teacher
    return FlowGuidedDistillationLoss(
        guide, classes=classes, s_min=d.s_min, s_max=d.s_max, distance=d.distance, guidance_weight=d.guidance_weight,
        guide_steps=d.guide_steps, huber_c=d.huber_c, lpips_weights=d.lpips_weights,
    )  # fmt: skip


def initialise(s: Stage, net: torch.nn.Module, spec: NetSpec, teacher_spec: NetSpec | None) -> str:
    """Load the student's starting weights; returns where it started (recorded in its metrics).

    `teacher_spec` is None for an imported teacher (its net is the user's, not a slimstep NetSpec): a dmd
    student can then not be a copy of it and starts from random init (+ TSM)."""
    if s.params.msd.objective == "dmd":
        if teacher_spec is not None and spec == teacher_spec:
            fit_weights(net, load_weights(TEACHER), TEACHER)
            return "teacher"
        print(f"msd: the dmd student's net differs from the teacher's, so it starts from random init "
              f"(+ {s.params.msd.tsm_steps} TSM steps)", file=sys.stderr)  # fmt: skip
        return "random"
    if spec == s.params.anneal.net:
        fit_weights(net, load_weights(ANNEALED, RAW_WEIGHTS), ANNEALED / RAW_WEIGHTS)
        return "anneal@slimflow"
    return "random"


def main(student: str) -> None:
    k = int(student)
    with stage(f"msd@{k}", ["msd", "distill", "anneal", "pairs"]) as s:
        p, a, pairs = s.params.msd, s.params.anneal, Path("pairs") / s.params.distill.pair_set  # as distill@fgd
        train, teacher = load_split(DATA).train, load_model(TEACHER, s.device).net
        shape, num_classes, spec = train.shape, train.num_classes, p.net or a.net
        if not train.conditional and len(p.students) > 1:
            raise UserError(f"msd.students = {p.students}: MSD partitions classes and these data are "
                            "unconditional (data/meta.json conditional: false); use msd.students: [0]")  # fmt: skip
        if len(p.students) > num_classes:
            raise UserError(f"msd.students has {len(p.students)} students for the {num_classes} classes of "
                            f"{DATA}/meta.json; each student needs a class: list at most {num_classes}")  # fmt: skip
        groups = partition_classes(num_classes, len(p.students), p.partition, class_means(train), p.partition_seed)
        torch.manual_seed(p.seed)
        net = build_net(spec, shape, num_classes).to(s.device)
        described = read_meta(TEACHER).get("net")  # absent for an imported teacher
        teacher_spec = NetSpec.model_validate(described) if described else None
        key, inputs = {"classes": groups[k], "msd": p.model_dump()}, [DATA, TEACHER, ANNEALED]
        metrics: dict = {"init": initialise(s, net, spec, teacher_spec)}
        own = of_classes(train, groups[k])
        if p.tsm_steps:
            tsm = p.model_copy(update={"steps": p.tsm_steps})
            batches = RandomBatches(own, tsm.batch_size, tsm.seed, s.device)
            result = s.train(net, TeacherScoreMatchingLoss(teacher, groups[k]), batches, tsm, {"tsm": key}, inputs)
            metrics["tsm_final_loss"] = sum(result.losses[-100:]) / len(result.losses[-100:])
        batches = PairStream(pairs, p.batch_size, p.seed, s.device)
        section = {"distill": s.params.distill.model_dump(include=GUIDE_KEYS), **key}
        if p.objective == "dmd":
            loss = dmd_objective(s, teacher, groups[k], RandomBatches(own, p.batch_size, p.seed + 1, s.device))
        else:
            loss = fgd_objective(s, teacher, groups[k])
        result = s.train(net, loss, batches, p, section, [*inputs, pairs])
        metrics["final_loss"] = sum(result.losses[-100:]) / len(result.losses[-100:])
        s.log_samples(result.ema, list(shape), num_classes, classes=list(groups[k]))
        extra = {}
        if p.objective == "dmd" and p.gan_steps:
            extra[BEFORE_GAN] = {name: w.detach().cpu().clone() for name, w in result.ema.state_dict().items()}
            gan = p.model_copy(update={"steps": p.gan_steps, "lr": p.gan_lr, "warmup_steps": 0})
            loss.gan_on = True  # type: ignore[union-attr]
            follow_generator(loss, gan)  # type: ignore[arg-type]
            result = s.train(net, loss, batches, gan, {"gan": section}, [*inputs, pairs])
            metrics["gan_final_loss"] = sum(result.losses[-100:]) / len(result.losses[-100:])
        save_model(Path(f"models/msd/{k}"), result.ema.cpu(), {
            "stage": f"msd@{k}", "kind": "onestep", "net": spec.model_dump(), "data_shape": list(shape),
            "num_classes": num_classes, "classes": groups[k], "partition": p.partition, "objective": p.objective,
        }, extra)  # fmt: skip
        s.write_metrics({
            **metrics, "classes": groups[k],
            "params": count_params(net), "macs": count_macs(net, shape, num_classes),
        })  # fmt: skip
