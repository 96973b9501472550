"""Stage `teacher`: class-conditional 1-rectified flow on the training set (docs/methods.md §1)."""

from pathlib import Path

import torch

from pipeline.app.stage import stage
from pipeline.data import RandomBatches, load_split
from pipeline.flow import RectifiedFlowLoss
from pipeline.modelio import save_model
from pipeline.nets import build_net, count_macs, count_params

OUT = Path("models/teacher")


def main() -> None:
    with stage("teacher", ["teacher"]) as s:
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
