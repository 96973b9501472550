"""Stage `featurizer`: the classifier whose features FD, precision/recall and class accuracy use.

Unconditional data (data/meta.json `conditional: false`) get fixed random conv features instead: one
label cannot train a classifier (see pipeline/featurizer.py).
"""

from pathlib import Path

import torch

from pipeline.app.stage import stage
from pipeline.data import RandomBatches, load_split
from pipeline.featurizer import Classifier, CrossEntropy, Identity, RandomFeatures, features, predict
from pipeline.metrics import class_accuracy, feature_health
from pipeline.modelio import save_model

OUT = Path("models/featurizer")


def main() -> None:
    with stage("featurizer", ["featurizer"]) as s:
        p, split = s.params.featurizer, load_split(Path("data"))
        meta = {"stage": "featurizer", "kind": "featurizer", "data_shape": list(split.train.shape),
                "num_classes": split.train.num_classes, "width": p.width}  # fmt: skip
        if len(split.train.shape) == 1:  # 2-D points: FD of the raw coordinates
            save_model(OUT, Identity(), {**meta, "identity": True})
            s.write_metrics({"identity": True})
            return
        test_x = torch.from_numpy(split.test.x)
        if not split.train.conditional:
            random_net = RandomFeatures(split.train.shape, p.width, p.seed)
            health = feature_health(features(random_net, test_x))
            save_model(OUT, random_net, {**meta, "random_features": True, "seed": p.seed})
            s.write_metrics({"random_features": True, "feature_rank": health.rank, "dead_units": health.dead_units})
            return
        torch.manual_seed(p.seed)
        net = Classifier(split.train.shape, split.train.num_classes, p.width).to(s.device)
        batches = RandomBatches(split.train, p.batch_size, p.seed, s.device)
        result = s.train(net, CrossEntropy(), batches, p, p, [Path("data")])
        classifier = result.ema.cpu()
        health = feature_health(features(classifier, test_x))
        save_model(OUT, classifier, meta)
        s.write_metrics({
            "heldout_acc": class_accuracy(predict(classifier, test_x), torch.from_numpy(split.test.labels)),
            "feature_rank": health.rank, "dead_units": health.dead_units,
        })  # fmt: skip
