"""Stage `data`: write the train / held-out arrays in [-1, 1] and their stats to data/."""

from pathlib import Path

from pipeline.app.stage import stage
from pipeline.data import build_split, save_split
from pipeline.datacheck import check_data


def main() -> None:
    with stage("data", ["data"]) as s:
        p = s.params.data
        toy2d = {
            "components": p.toy2d_components,
            "radius": p.toy2d_radius,
            "std": p.toy2d_std,
            "train": p.toy2d_train,
        }
        try:
            split = build_split(p.dataset, p.path, p.heldout, p.seed, toy2d)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from None
        for part, ds in (("train", split.train), ("test", split.test)):
            check_data(ds.x, ds.labels, f"data.dataset = {p.dataset} ({part} part)")
        save_split(split, Path("data"))
        s.write_metrics(
            {"n_train": len(split.train), "n_test": len(split.test), "num_classes": split.train.num_classes}
        )
