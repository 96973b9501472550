"""Stage `meanflow`: the one-step model a user could train instead of distilling (docs/methods.md §9).

A MeanFlow net at the student's size (`anneal.net`, plus an embedding of the second time) from random
init on the training data — no teacher, no pairs — with the compute-matched naive student's steps and
batch (`anneal.steps + distill.steps`, `distill.batch_size`) unless `meanflow.steps` / `batch_size` say
otherwise. Saved as kind `meanflow`: loaded as a velocity model whose one-step sample is the MeanFlow map.
"""

from pathlib import Path

import torch

from pipeline.app.stage import stage
from pipeline.config import MeanflowSection, Params
from pipeline.data import Dataset, RandomBatches, load_split
from pipeline.meanflow import MeanFlowLoss, MeanFlowNet
from pipeline.modelio import save_model
from pipeline.nets import count_macs, count_params

DATA = Path("data")


def recipe(params: Params, train: Dataset, device: torch.device) -> tuple[MeanflowSection, MeanFlowNet, MeanFlowLoss,
                                                                          RandomBatches]:
    """Settings, net, loss and batches of the stage: its steps and batch default to the compute-matched naive
    student's. `benchmarks/meanflow_curve.py` trains exactly this."""
    p, a, d = params.meanflow, params.anneal, params.distill
    matched_steps, matched_batch = a.steps + d.steps, d.batch_size  # read always: dvc.yaml lists them
    settings = p.model_copy(update={"steps": p.steps or matched_steps, "batch_size": p.batch_size or matched_batch})
    torch.manual_seed(settings.seed)
    net = MeanFlowNet(a.net, train.shape, train.num_classes).to(device)
    loss = MeanFlowLoss(p.flow_fraction, p.time_mean, p.time_std, p.weight_power, p.weight_c)
    return settings, net, loss, RandomBatches(train, settings.batch_size, settings.seed, device)


def main() -> None:
    with stage("meanflow", ["meanflow"]) as s:
        a = s.params.anneal
        train = load_split(DATA).train
        shape, classes = train.shape, train.num_classes
        settings, net, loss, batches = recipe(s.params, train, s.device)
        result = s.train(net, loss, batches, settings, {"net": a.net.model_dump(), **settings.model_dump()}, [DATA])
        save_model(Path("models/meanflow"), result.ema.cpu(), {
            "stage": "meanflow", "kind": "meanflow", "net": a.net.model_dump(), "data_shape": list(shape),
            "num_classes": classes, "steps": settings.steps,
        })  # fmt: skip
        s.write_metrics({
            "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:]), "steps": settings.steps,
            "batch_size": settings.batch_size, "params": count_params(net), "macs": count_macs(net, shape, classes),
        })  # fmt: skip
