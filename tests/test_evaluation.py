"""Leaderboard rows on tiny data against exact answers (an exact-velocity model, pure noise), and model artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pipeline.data import load_digits_split, make_toy2d
from pipeline.evaluation import (
    NOISE_SEED_BASE,
    Reference,
    eval_noise,
    evaluate_sampler,
    group_quality,
    make_reference,
    real_floor,
)
from pipeline.featurizer import Classifier, Identity
from pipeline.flow import ExactVelocity
from pipeline.modelio import META, MODEL_FORMAT, WEIGHTS, load_model, read_meta, save_model
from pipeline.nets import NetSpec, build_net

N = 100  # samples per seed
SHAPE = (1, 8, 8)


class PrototypeClassifier(nn.Module):
    """Nearest-class-mean classifier with raw pixels as features: a featurizer that needs no training."""

    def __init__(self, x: Tensor, labels: Tensor, num_classes: int) -> None:
        super().__init__()
        flat = x.flatten(1)
        means = torch.stack([flat[labels == c].mean(0) for c in range(num_classes)])
        self.head = nn.Linear(flat.shape[1], num_classes)
        with torch.no_grad():
            self.head.weight.copy_(means)
            self.head.bias.copy_(-0.5 * means.square().sum(1))

    def features(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ExactModel(nn.Module):
    """The exact class-conditional 1-RF velocity of the train set, as a module."""

    def __init__(self, x: Tensor, labels: Tensor) -> None:
        super().__init__()
        self.oracle = ExactVelocity(x, labels)
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        self.calls += 1
        return self.oracle(x, t, label)


class NoiseModel(nn.Module):
    """A model that learned nothing: its velocity is fresh Gaussian noise."""

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        return torch.randn_like(x)


@pytest.fixture(scope="module")
def ref() -> Reference:
    split = load_digits_split(heldout=N, seed=0)
    train_x, train_y = torch.from_numpy(split.train.x[:400]), torch.from_numpy(split.train.labels[:400])
    test_x, test_y = torch.from_numpy(split.test.x), torch.from_numpy(split.test.labels)
    featurizer = PrototypeClassifier(train_x, train_y, 10)
    return make_reference(train_x, test_x, test_y, featurizer, N, train_labels=train_y)


@pytest.fixture(scope="module")
def noise() -> list[Tensor]:
    return eval_noise(SHAPE, N, seeds=2)


# Fixed evaluation noise.
def test_eval_noise_is_fixed_per_seed_and_independent_of_global_rng() -> None:
    torch.manual_seed(1)
    first = eval_noise(SHAPE, 16, seeds=3)
    torch.manual_seed(2)
    second = eval_noise(SHAPE, 16, seeds=3)
    assert len(first) == 3 and all(z.shape == (16, *SHAPE) for z in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert torch.equal(eval_noise(SHAPE, 16, seeds=5)[2], first[2])  # more seeds add noise, never change it
    expected = torch.randn((16, *SHAPE), generator=torch.Generator().manual_seed(NOISE_SEED_BASE))
    assert torch.equal(first[0], expected)


def test_reference_cycles_the_held_out_labels(ref: Reference) -> None:
    bigger = make_reference(ref.train_x, ref.test_x, ref.test_labels, ref.featurizer, 2 * N + 3)
    assert torch.equal(bigger.labels[:N], ref.test_labels) and torch.equal(bigger.labels[N : 2 * N], ref.test_labels)
    assert torch.equal(bigger.labels[-3:], ref.test_labels[:3])
    assert ref.classifies and ref.train_feats.shape == (400, 64) and ref.test_feats.shape == (N, 64)


# Quality against exact answers.
def test_real_floor_scores_the_held_out_set(ref: Reference) -> None:
    floor = real_floor(ref, knn_k=3)
    assert floor["fd"] > 0 and math.isnan(floor["fd_heldout"]) and math.isnan(floor["fd_heldout_std"])
    assert floor["sampler"] == "data" and floor["nfe"] == 0.0
    assert floor["memorisation"] == pytest.approx(1.0)  # held-out images are as far from train as themselves
    assert floor["class_acc"] > 0.8 and floor["out_of_range"] == 0.0


def test_exact_velocity_reaches_the_floor_and_noise_does_not(ref: Reference, noise: list[Tensor]) -> None:
    floor = real_floor(ref, knn_k=3)
    exact = evaluate_sampler(ExactModel(ref.train_x, ref.train_labels), "euler-8", ref, noise, 64, 3, 32)
    junk = evaluate_sampler(NoiseModel(), "euler-2", ref, noise, 64, 3, 32)
    assert exact["fd"] < 1.5 * floor["fd"]
    assert junk["fd"] > 10 * exact["fd"] and junk["fd_heldout"] > 10 * exact["fd_heldout"]
    # The exact model honours the asked labels as far as the featurizer can tell; noise is at chance.
    assert exact["class_acc"] > floor["class_acc"] - 0.05 and junk["class_acc"] < 0.4
    assert exact["precision"] > 0.9 and junk["precision"] < 0.2
    assert exact["memorisation"] < 0.1  # the exact 1-RF flow of a finite set copies it: the ratio flags that
    assert exact["out_of_range"] == 0.0 and junk["out_of_range"] > 0.1
    assert exact["fd_std"] > 0 and exact["samples_per_s"] > 0 and exact["latency_ms"] > 0


@pytest.mark.parametrize(("sampler", "nfe"), [("euler-3", 3), ("heun-3", 5), ("onestep", 1)])
def test_reported_nfe_matches_the_network_calls(ref: Reference, noise: list[Tensor], sampler: str, nfe: int) -> None:
    model = ExactModel(ref.train_x, ref.train_labels)
    row = evaluate_sampler(model, sampler, ref, noise, batch_size=64, knn_k=3, timing_batch=32)
    assert row["sampler"] == sampler and row["nfe"] == nfe
    solves = len(noise) * math.ceil(N / 64) + 1 + 3  # two chunks per seed, then 1 warm-up + 3 timed solves
    assert model.calls == nfe * solves


def test_dopri5_row_uses_the_canonical_name(ref: Reference, noise: list[Tensor]) -> None:
    smooth = lambda x, t, label: -x  # noqa: E731 - a linear ODE the adaptive solver handles in few steps
    row = evaluate_sampler(smooth, "dopri5-1e-3", ref, noise[:1], 64, 3, 32)
    assert row["sampler"] == "dopri5-0.001" and row["nfe"] >= 6 and row["fd_std"] == 0.0


def test_identity_featurizer_reports_no_class_accuracy() -> None:
    split = make_toy2d(4, 4.0, 0.25, 200, 50, seed=0)
    train_x, test_x = torch.from_numpy(split.train.x), torch.from_numpy(split.test.x)
    toy = make_reference(train_x, test_x, torch.from_numpy(split.test.labels), Identity(), 50)
    assert not toy.classifies
    floor = real_floor(toy, knn_k=3)
    assert math.isnan(floor["class_acc"]) and floor["fd"] > 0


def test_group_quality_scores_each_class_group(ref: Reference, noise: list[Tensor]) -> None:
    model = ExactModel(ref.train_x, ref.train_labels)
    rows = group_quality(model, ref, noise, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    assert [row["group"] for row in rows] == [0, 1] and rows[1]["classes"] == "5 6 7 8 9"
    assert all(np.isfinite(row["fd"]) and 0 <= row["class_acc"] <= 1 for row in rows)
    no_labels = make_reference(ref.train_x, ref.test_x, ref.test_labels, ref.featurizer, N)
    with pytest.raises(ValueError, match="train_labels"):
        group_quality(model, no_labels, noise, [[0]])


# Model artifacts.
SPEC = NetSpec(kind="mlp", width=16, depth=1, emb_dim=8)


def flow_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_net(SPEC, (2,), 4)


def flow_meta() -> dict:
    return {"stage": "teacher", "kind": "flow", "net": SPEC.model_dump(), "data_shape": [2], "num_classes": 4}


def test_saved_model_loads_with_identical_outputs(tmp_path: Path) -> None:
    net = flow_net()
    save_model(tmp_path / "teacher", net, flow_meta())
    loaded = load_model(tmp_path / "teacher")
    x, t, label = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 3, 0])
    assert torch.equal(loaded.net(x, t, label), net(x, t, label))
    assert loaded.name == "teacher" and not loaded.net.training
    assert not any(p.requires_grad for p in loaded.net.parameters())
    meta = read_meta(tmp_path / "teacher")
    assert meta["format_version"] == MODEL_FORMAT and "t=0" in meta["time_convention"]
    assert torch.load(tmp_path / "teacher" / WEIGHTS, weights_only=True).keys() == net.state_dict().keys()


def test_identical_inputs_give_byte_identical_artifacts(tmp_path: Path) -> None:
    save_model(tmp_path / "a", flow_net(0), flow_meta())
    save_model(tmp_path / "b", flow_net(0), flow_meta())
    save_model(tmp_path / "c", flow_net(1), flow_meta())
    for name in (WEIGHTS, META):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / WEIGHTS).read_bytes() != (tmp_path / "c" / WEIGHTS).read_bytes()
    text = (tmp_path / "a" / META).read_text()
    same, other = json.loads(text), json.loads((tmp_path / "c" / META).read_text())
    assert same.pop("sha256") != other.pop("sha256") and same == other  # only the weights' hash differs
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys: stable diffs


def test_featurizer_artifacts_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = Classifier((1, 8, 8), 10, width=16)
    save_model(tmp_path / "f", classifier, {"stage": "featurizer", "kind": "featurizer", "data_shape": [1, 8, 8],
                                            "num_classes": 10, "width": 16})  # fmt: skip
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(load_model(tmp_path / "f").net.features(x), classifier.features(x))
    save_model(tmp_path / "i", Identity(), {"stage": "featurizer", "kind": "featurizer", "identity": True,
                                            "data_shape": [2], "num_classes": 8})  # fmt: skip
    assert isinstance(load_model(tmp_path / "i").net, Identity)


def test_loader_tolerates_older_and_refuses_newer_or_unknown(tmp_path: Path) -> None:
    save_model(tmp_path / "m", flow_net(), flow_meta())
    meta_path = tmp_path / "m" / META
    meta = json.loads(meta_path.read_text())
    del meta["format_version"]  # metadata written before versioning
    meta_path.write_text(json.dumps(meta))
    assert load_model(tmp_path / "m").meta["stage"] == "teacher"
    meta_path.write_text(json.dumps({**meta, "format_version": MODEL_FORMAT + 1}))
    with pytest.raises(ValueError, match="newer than this slimstep"):
        load_model(tmp_path / "m")
    meta_path.write_text(json.dumps({**meta, "kind": "diffusion"}))
    with pytest.raises(ValueError, match=r"unknown model kind 'diffusion' \(known: .*'flow'"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(tmp_path / "absent")
