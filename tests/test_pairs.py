"""Pair store: every pair present, per-sample seeds, NFE per batch, byte-identical resume, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pipeline.flow import EPS, SampleResult, sample
from pipeline.pairs import (
    SEED_FORMULA,
    PairStoreMismatch,
    PairStream,
    generate_pairs,
    load_metadata,
    pair_noise,
)

SHAPE, CLASSES, SIGMA = (1, 2, 2), 3, 0.5
MU = torch.tensor([-0.6, 0.1, 0.7])  # class means


class GaussianFlow:
    """Exact 1-RF velocity of per-class data N(mu_y, sigma^2 I): elementwise, so batch-independent.

    x_t = t mu + s(t) z0 with s(t) = sqrt(t^2 sigma^2 + (1 - t)^2), hence v = mu + s'(t) (x_t - t mu) / s(t).
    """

    def __call__(self, x_t: Tensor, t: Tensor, label: Tensor) -> Tensor:
        mu, t = MU[label].reshape(-1, 1, 1, 1), t.reshape(-1, 1, 1, 1)
        s2 = t**2 * SIGMA**2 + (1 - t) ** 2
        return mu + (t * SIGMA**2 - (1 - t)) / s2 * (x_t - t * mu)


def make(root: Path, n_pairs: int = 10, **kw) -> object:
    args = {"shard_size": 4, "solve_batch": 2, "sampler": "euler-3", "seed": 7, "fp16": False} | kw
    return generate_pairs(
        GaussianFlow(), root, n_pairs, data_shape=SHAPE, num_classes=CLASSES, progress=False, **args
    )


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def load_all(root: Path) -> dict[str, Tensor]:
    shards = [torch.load(root / e["file"], weights_only=True) for e in load_metadata(root)["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in ("z", "x", "label")}


def test_generate_stores_every_pair_with_nfe_per_solve_batch(tmp_path: Path) -> None:
    stats = make(tmp_path)
    assert sorted(files(tmp_path)) == ["metadata.json", "shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]
    shards = [torch.load(tmp_path / f"shard-{i:05d}.pt", weights_only=True) for i in range(3)]
    assert [len(s["z"]) for s in shards] == [4, 4, 2]
    assert [s["nfe"].tolist() for s in shards] == [[3, 3], [3, 3], [3]]
    pairs = load_all(tmp_path)
    z, label = pair_noise(7, range(10), SHAPE, range(CLASSES))
    assert torch.equal(pairs["z"], z) and torch.equal(pairs["label"], label)
    assert torch.equal(pairs["x"], sample(GaussianFlow(), z, label, "euler-3").x)
    meta = load_metadata(tmp_path)
    assert meta["complete"] and meta["seed_formula"] == SEED_FORMULA and meta["data_shape"] == list(SHAPE)
    assert (meta["n_pairs"], meta["solve_batch"], meta["sampler"]) == (10, 2, "euler-3")
    assert (stats.n_pairs, stats.n_new, stats.nfe_mean, stats.nfe_max) == (10, 10, 3.0, 3)
    assert stats.pairs_per_s > 0 and stats.bytes_per_pair > 0


def test_adaptive_pairs_follow_the_exact_flow_map(tmp_path: Path) -> None:
    stats = make(tmp_path, sampler="dopri5-1e-05", labels=[0, 2])
    pairs = load_all(tmp_path)
    assert set(pairs["label"].tolist()) <= {0, 2}
    mu = MU[pairs["label"]].reshape(-1, 1, 1, 1)
    s_eps = (EPS**2 * SIGMA**2 + (1 - EPS) ** 2) ** 0.5
    assert torch.allclose(pairs["x"], mu + SIGMA * (pairs["z"] - EPS * mu) / s_eps, atol=1e-4)
    assert stats.nfe_max > 6  # per solve batch, as torchdiffeq called the field


def test_killed_run_resumes_to_identical_bytes(tmp_path: Path) -> None:
    make(tmp_path / "ref")
    calls = 0

    def dying(v, z: Tensor, label: Tensor) -> SampleResult:
        nonlocal calls
        calls += 1
        if calls == 4:  # inside shard 1, after shard 0 was written
            raise KeyboardInterrupt
        return sample(v, z, label, "euler-3")

    root = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make(root, solver_fn=dying)
    assert [e["file"] for e in load_metadata(root)["shards"]] == ["shard-00000.pt"]
    assert not load_metadata(root)["complete"]
    (root / ".shard-00001.pt.x1y2.tmp").write_bytes(b"half a shard")
    stats = make(root)
    assert stats.n_new == 6
    assert files(root) == files(tmp_path / "ref")  # no temp file left, same bytes everywhere


def test_deleted_shard_is_regenerated(tmp_path: Path) -> None:
    make(tmp_path)
    before = files(tmp_path)
    (tmp_path / "shard-00001.pt").unlink()
    assert make(tmp_path).n_new == 6  # shard 1 and everything after it
    assert files(tmp_path) == before
    assert make(tmp_path).n_new == 0  # a complete store is left alone


def test_growing_or_shrinking_n_pairs_keeps_unchanged_shards(tmp_path: Path) -> None:
    make(tmp_path / "ref10")
    make(tmp_path / "ref5", n_pairs=5)
    root = tmp_path / "run"
    make(root, n_pairs=6)
    assert make(root).n_new == 6  # the short shard of 2 is redone as a full one
    assert files(root) == files(tmp_path / "ref10")
    assert make(root, n_pairs=5).n_new == 1
    assert files(root) == files(tmp_path / "ref5")


@pytest.mark.parametrize("change", [{"seed": 8}, {"solve_batch": 4}, {"sampler": "heun-2"}, {"fp16": True}])
def test_changed_request_raises(tmp_path: Path, change: dict) -> None:
    make(tmp_path)
    key = next(iter(change))
    with pytest.raises(PairStoreMismatch, match=key):
        make(tmp_path, **change)


def test_bad_requests_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        make(tmp_path, solve_batch=3)
    with pytest.raises(ValueError, match="sampler"):
        make(tmp_path, sampler="rk4")
    with pytest.raises(ValueError, match="labels"):
        make(tmp_path, labels=[5])
    assert not tmp_path.joinpath("metadata.json").exists()


def test_pairs_do_not_depend_on_solve_batch(tmp_path: Path) -> None:
    make(tmp_path / "b1", solve_batch=1)
    make(tmp_path / "b4", solve_batch=4)
    a, b = load_all(tmp_path / "b1"), load_all(tmp_path / "b4")
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["label"], b["label"])
    assert torch.allclose(a["x"], b["x"], rtol=0, atol=1e-6)


def test_fp16_halves_image_bytes(tmp_path: Path) -> None:
    big = {"n_pairs": 128, "shard_size": 64, "solve_batch": 64}  # tiny records hide in zip alignment padding
    full, half = make(tmp_path / "f32", **big), make(tmp_path / "f16", fp16=True, **big)
    x32, x16 = load_all(tmp_path / "f32")["x"], load_all(tmp_path / "f16")["x"]
    assert x16.dtype == torch.float16 and 2 * x16.nbytes == x32.nbytes
    assert torch.allclose(x16.float(), x32, atol=1e-3)
    assert torch.equal(load_all(tmp_path / "f16")["z"], load_all(tmp_path / "f32")["z"])  # noise stays exact
    assert full.bytes_per_pair - half.bytes_per_pair == pytest.approx(2 * 4, abs=2)


# Streaming.


def pair_ids(batches) -> list[float]:
    """Each pair's first noise value identifies it (continuous noise: no ties)."""
    return [float(v) for b in batches for v in b.z.flatten(1)[:, 0]]


def test_epoch_visits_every_pair_once_in_a_fresh_order(tmp_path: Path) -> None:
    make(tmp_path)
    stored = load_all(tmp_path)
    stream = PairStream(tmp_path, batch_size=3, seed=1)
    epoch0 = list(stream.epoch_iter(0))
    assert [len(b.label) for b in epoch0] == [3, 3, 3, 1]
    ids0, ids1 = pair_ids(epoch0), pair_ids(stream.epoch_iter(1))
    assert sorted(ids0) == sorted(ids1) == sorted(stored["z"].flatten(1)[:, 0].tolist())
    assert ids0 != ids1
    assert ids0 == pair_ids(PairStream(tmp_path, batch_size=3, seed=1).epoch_iter(0))  # deterministic
    assert ids0 != pair_ids(PairStream(tmp_path, batch_size=3, seed=2).epoch_iter(0))
    by_id = {
        float(z[0]): (x, y)
        for z, x, y in zip(stored["z"].flatten(1), stored["x"], stored["label"], strict=True)
    }
    for b in epoch0:  # pairs stay whole through the shuffle
        assert b.x.dtype == torch.float32
        for z, x, y in zip(b.z.flatten(1), b.x, b.label, strict=True):
            assert torch.equal(x, by_id[float(z[0])][0]) and y == by_id[float(z[0])][1]


def test_stream_runs_across_epochs_and_resumes(tmp_path: Path) -> None:
    make(tmp_path)
    stream = PairStream(tmp_path, batch_size=4, seed=1, shuffle_buffer_shards=1)
    first = [next(stream) for _ in range(3)]
    assert all(len(b.label) == 4 for b in first)
    assert stream.state_dict() == {"epoch": 1, "position": 2}
    rest = [next(stream) for _ in range(2)]
    one_pass = pair_ids(stream.epoch_iter(0)) + pair_ids(stream.epoch_iter(1))
    assert pair_ids(first + rest) == one_pass[:20]

    resumed = PairStream(tmp_path, batch_size=4, seed=1, shuffle_buffer_shards=1)
    resumed.load_state_dict({"epoch": 1, "position": 2})
    assert pair_ids([next(resumed), next(resumed)]) == pair_ids(rest)
    from_step = PairStream(tmp_path, batch_size=4, seed=1, shuffle_buffer_shards=1, start_batch=3)
    assert pair_ids([next(from_step), next(from_step)]) == pair_ids(rest)


def test_stream_refuses_an_incomplete_store(tmp_path: Path) -> None:
    make(tmp_path)
    meta = load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps(meta | {"complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        PairStream(tmp_path, batch_size=4, seed=0)
