"""Unconditional data end to end: a label-free featurizer whose FD means something, grids without class rows,
MSD refused with one line, and the smoke chain from an imported flat folder of PNGs (with FID)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline.data import load_digits_split
from pipeline.featurizer import RandomFeatures, features
from pipeline.grids import sample_grid
from pipeline.metrics import frechet_distance
from pipeline.modelio import load_model, save_model
from tests.conftest import make_project, run


def test_random_features_fd_separates_real_images_from_noise_and_blur() -> None:
    split = load_digits_split(360, 0)  # used without its labels
    train, test = torch.from_numpy(split.train.x), torch.from_numpy(split.test.x)
    net = RandomFeatures(split.train.shape, width=64, seed=0)
    reference = features(net, train)
    real = frechet_distance(reference, features(net, test))
    noise = frechet_distance(reference, features(net, torch.rand_like(test) * 2 - 1))
    blurred = torch.nn.functional.avg_pool2d(test, 3, stride=1, padding=1, count_include_pad=False)
    blur = frechet_distance(reference, features(net, blurred))
    assert noise > 20 * real and blur > 3 * real


def test_random_features_are_fixed_by_the_seed_and_round_trip(tmp_path: Path) -> None:
    a, b = RandomFeatures((1, 8, 8), 16, seed=3), RandomFeatures((1, 8, 8), 16, seed=3)
    c = RandomFeatures((1, 8, 8), 16, seed=0)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(a.features(x), b.features(x)) and not torch.equal(a.features(x), c.features(x))
    assert not hasattr(a, "head")  # no class accuracy from a label-free featurizer
    meta = {"stage": "featurizer", "kind": "featurizer", "data_shape": [1, 8, 8], "num_classes": 1, "width": 16,
            "random_features": True, "seed": 3}  # fmt: skip
    save_model(tmp_path / "f", a, meta)
    assert torch.equal(load_model(tmp_path / "f").net.features(x), a.features(x))


def test_unconditional_grid_is_a_mosaic_without_class_rows(tmp_path: Path) -> None:
    x = torch.linspace(-1, 1, 20 * 3 * 8 * 8).reshape(20, 3, 8, 8)
    sample_grid(x, torch.zeros(20, dtype=torch.long), 1, tmp_path / "grid.png", "unconditional", conditional=False)
    width, height = Image.open(tmp_path / "grid.png").size
    assert width > 0.6 * height and height > 0.6 * width  # 5 x 4 images, not one long row


def _flat_pngs(folder: Path, n: int = 60) -> None:
    """Coloured squares at random places on 12x12 black (the import resizes to 8x8)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        image = np.zeros((12, 12, 3), np.uint8)
        r, c = rng.integers(2, 10, 2)
        image[r - 2 : r + 2, c - 2 : c + 2] = rng.integers(60, 255, 3)
        Image.fromarray(image).save(folder / f"{i:03d}.png")


class _StandIn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(48, 32)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return self.lin(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1))


@pytest.mark.slow
def test_flat_png_folder_runs_pairs_students_and_eval_with_fid(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "repo")
    _flat_pngs(tmp_path / "blobs")
    imported = run(["slimstep", "import-data", str(tmp_path / "blobs"), "--size", "8"], repo)
    assert "60 images 3x8x8" in imported.stdout and "unconditional" in imported.stdout
    torch.jit.save(torch.jit.script(_StandIn()), str(repo / "inputs/inception.pt"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["fid"] = {"inception": "inputs/inception.pt", "reference": "train", "n_samples": 64}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], repo)

    assert json.loads((repo / "data/meta.json").read_text())["conditional"] is False
    assert json.loads((repo / "models/featurizer/meta.json").read_text())["random_features"] is True
    assert json.loads((repo / "pairs/teacher/metadata.json").read_text())["labels"] == [0]
    board = pd.read_csv(repo / "reports/leaderboard.csv")
    assert {"distill@fgd", "distill@naive", "msd@ensemble", "teacher", "real"} <= set(board["model"])
    assert board["class_acc"].isna().all()  # omitted, not a fake number
    assert board["fid"].notna().all() and (board["fid"] >= 0).all() and "kid" in board.columns
    protocol = json.loads((repo / "reports/metrics.json").read_text())["fid_protocol"]
    assert protocol["n_samples"] == 64 and protocol["features"] == 32 and len(protocol["inception_sha256"]) == 64
    assert (repo / "reports/grids/distill-fgd.png").exists()

    params["msd"]["students"] = [0, 1]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    refused = run(["python", "-m", "stages", "msd", "1"], repo, check=False)
    assert refused.returncode != 0 and "MSD partitions classes" in refused.stderr
    assert len([line for line in refused.stderr.splitlines() if line.strip()]) == 1


def test_mnist_profiles_validate_and_the_data_stage_makes_28x28_digits(tmp_path: Path) -> None:
    from pipeline.config import validate_params
    from pipeline.data import build_split
    from pipeline.profiles import render

    configs = Path(__file__).parents[1] / "configs"
    for name in ("mnist", "mnist-unet"):
        params = validate_params(render(name, configs), name)
        assert params.data.dataset == "mnist" and params.profile == name
    split = build_split("mnist", None, 1000, 0, {})
    assert split.train.shape == (1, 28, 28) and (len(split.train), len(split.test)) == (4000, 1000)
    assert np.bincount(split.test.labels).tolist() == [100] * 10 and split.train.conditional
    assert math.isclose(split.train.x.min(), -1.0) and math.isclose(split.train.x.max(), 1.0)
