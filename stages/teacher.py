"""Stage `teacher`: train a class-conditional 1-rectified flow (docs/methods.md §1), or wrap and check an
imported one (`teacher.source`, docs/methods.md §8) without training."""

import sys
from pathlib import Path

import torch

from pipeline.app.stage import Stage, stage
from pipeline.data import RandomBatches, load_split
from pipeline.flow import RectifiedFlowLoss
from pipeline.modelio import save_model
from pipeline.nets import build_net, count_macs, count_params
from pipeline.teachers import TeacherFolderError, import_teacher, save_teacher

OUT = Path("models/teacher")


def train(s: Stage) -> None:
    p, split = s.params.teacher, load_split(Path("data"))
    shape, classes = split.train.shape, split.train.num_classes
    torch.manual_seed(p.seed)
    net = build_net(p.net, shape, classes).to(s.device)
    batches = RandomBatches(split.train, p.batch_size, p.seed, s.device)
    result = s.train(net, RectifiedFlowLoss(), batches, p, p, [Path("data")])
    save_model(OUT, result.ema.cpu(), {
        "stage": "teacher", "kind": "flow", "net": p.net.model_dump(), "data_shape": list(shape),
        "num_classes": classes, "default_sampler": "dopri5-1e-05",
    })  # fmt: skip
    s.write_metrics({
        "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:]),
        "params": count_params(net), "macs": count_macs(net, shape, classes),
    })  # fmt: skip


def wrap_imported(s: Stage) -> None:
    source, split = s.params.teacher.source.model_dump(), load_split(Path("data"))
    shape = split.train.shape
    try:
        teacher = import_teacher(source, shape, split.train.num_classes)
    except TeacherFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    save_teacher(OUT, teacher, {"stage": "teacher", "kind": "flow", "data_shape": list(shape),
                                "default_sampler": "dopri5-1e-05"})  # fmt: skip
    classes = teacher.meta["num_classes"]
    print(f"teacher: imported {source['kind']} {source['path']} ({teacher.meta['conversion']})")
    s.write_metrics({
        "source": source["kind"], "prediction": teacher.meta["prediction"], "trained_steps": 0,
        "params": count_params(teacher.net), "macs": count_macs(teacher.net, shape, classes),
    })  # fmt: skip


def main() -> None:
    with stage("teacher", ["teacher"]) as s:
        (train if s.params.teacher.source.kind == "train" else wrap_imported)(s)
