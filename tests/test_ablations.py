"""The benchmark's ablations re-run student stages in copies of a finished run and score them like `eval`."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from benchmarks.ablations import edited, half_width, net_params, run_ablations, score, variants, width_for
from pipeline.config import NetSpec
from pipeline.modelio import load_model
from pipeline.nets import build_net, count_params


def test_edited_sets_nested_keys_and_leaves_the_input_alone() -> None:
    params = {"msd": {"steps": 10, "net": None}, "distill": {"guidance_weight": 1.0}}
    out = edited(params, {"msd.steps": 14, "msd.net": {"kind": "mlp"}, "distill.guidance_weight": 0.0})
    assert out == {"msd": {"steps": 14, "net": {"kind": "mlp"}}, "distill": {"guidance_weight": 0.0}}
    assert params["msd"]["steps"] == 10


def test_half_width_halves_the_parameters() -> None:
    net = {"kind": "resmlp", "width": 180, "depth": 2, "channels": [32, 64], "emb_dim": 64, "dropout": 0.0}
    width = half_width(net, (1, 8, 8), 10)
    full = count_params(build_net(NetSpec(**net), (1, 8, 8), 10))
    half = count_params(build_net(NetSpec(**{**net, "width": width}), (1, 8, 8), 10))
    assert width is not None and width < 180 and abs(half / full - 0.5) < 0.03
    assert half_width({**net, "kind": "unet"}, (1, 8, 8), 10) is None


def test_tsm_variants_are_compute_matched() -> None:
    params = {"msd": {"steps": 500, "students": [0, 1]}, "anneal": {"net": {
        "kind": "mlp", "width": 64, "depth": 2, "channels": [8], "emb_dim": 16, "dropout": 0.0}},
        "pairs": {"train_set": "teacher", "sets": {"teacher": {"solver": "dopri5-1e-04"}}}}  # fmt: skip
    by_name = {v.name: v for v in variants(params, (2,), 4)}
    assert set(by_name) == {"term_off", "regen_on", "regen_off", "tsm_on", "tsm_off",  # 4 classes: no K = 5
                            "dmd_k1", "dmd_k2", "dmd_k4"}  # fmt: skip
    on, off = by_name["tsm_on"].edits, by_name["tsm_off"].edits
    assert on["msd.tsm_steps"] == 200 and off["msd.tsm_steps"] == 0 and off["msd.steps"] == 500 + 200
    assert on["msd.net"] == off["msd.net"] and on["msd.net"]["width"] < 64
    assert by_name["tsm_on"].commands == [["stages", "msd", "0"], ["stages", "msd", "1"], ["stages", "router"]]


def test_regenerated_pair_variants_solve_the_annealed_flow_like_the_teacher_set() -> None:
    params = {"msd": {"steps": 500, "students": [0]}, "anneal": {"net": {"kind": "unet"}},
              "pairs": {"train_set": "teacher", "sets": {"teacher": {"solver": "heun-8"}}}}  # fmt: skip
    by_name = {v.name: v for v in variants(params, (2,), 4)}
    on, off = by_name["regen_on"], by_name["regen_off"]
    assert on.edits["pairs.sets.regen"] == {"solver": "heun-8", "policy": "models/teacher",
                                            "flow": "models/anneal@slimflow"}  # fmt: skip
    assert on.edits["distill.pair_set"] == off.edits["distill.pair_set"] == "regen"
    assert off.edits["distill.guidance_weight"] == 0.0 and "distill.guidance_weight" not in on.edits
    assert on.commands == off.commands == [["stages", "pairs", "regen"], ["stages", "distill", "fgd"]]


def test_dmd_variants_give_every_k_the_same_per_student_budget() -> None:
    params = {"msd": {"steps": 5000, "students": [0, 1]}, "anneal": {"net": {"kind": "unet"}},
              "pairs": {"train_set": "teacher", "sets": {"teacher": {"solver": "heun-8"}}}}  # fmt: skip
    dmd = {v.name: v for v in variants(params, (2,), 3) if v.name.startswith("dmd")}
    assert set(dmd) == {"dmd_k1", "dmd_k2"}  # K = 4 needs 4 classes
    for k, variant in ((1, dmd["dmd_k1"]), (2, dmd["dmd_k2"])):
        assert variant.edits == {"msd.objective": "dmd", "msd.students": list(range(k)), "msd.tsm_steps": 1000,
                                 "msd.steps": 500, "msd.gan_steps": 150}  # fmt: skip
        assert variant.before_gan and variant.model == "msd@ensemble" and variant.commands[-1] == ["stages", "router"]
        assert len(variant.commands) == k + 1


def test_width_for_picks_the_closest_parameter_count() -> None:
    net = {"kind": "resmlp", "width": 180, "depth": 2, "channels": [32, 64], "emb_dim": 64, "dropout": 0.0}
    for target in (20_000, 100_000, 450_000):
        width = width_for(net, (1, 8, 8), 10, target, widest=400)
        best = min(range(8, 401), key=lambda w: abs(net_params({**net, "width": w}, (1, 8, 8), 10) - target))
        assert width == best


@pytest.mark.slow
def test_ablations_rerun_students_in_copies_and_score_like_eval(smoke_repo, tmp_path) -> None:
    before = sorted(p.name for p in (smoke_repo / "models").iterdir())
    results = run_ablations([smoke_repo], tmp_path)[smoke_repo]
    dmd = {f"dmd_k{k}{after}" for k in (1, 2, 4) for after in ("", "_before_gan")}
    assert set(results) == {"term_off", "regen_on", "regen_off", "msd_k5", "tsm_on", "tsm_off", *dmd}
    assert all(math.isfinite(r["fd"]) and r["train_s"] > 0 for r in results.values())
    assert sorted(p.name for p in (smoke_repo / "models").iterdir()) == before  # the run itself is untouched
    assert not (smoke_repo / "pairs" / "regen").exists()  # regenerated pairs are written in the copy only
    assert (tmp_path / "ablation-0-regen_on" / "pairs" / "regen").is_dir()

    k5 = tmp_path / "ablation-0-msd_k5"
    assert sorted(p.name for p in (k5 / "models" / "msd").iterdir()) == ["0", "1", "2", "3", "4"]
    params = yaml.safe_load((tmp_path / "ablation-0-tsm_off" / "params.yaml").read_text())
    assert params["msd"]["tsm_steps"] == 0 and params["msd"]["net"]["width"] < params["anneal"]["net"]["width"]

    board = pd.read_csv(smoke_repo / "reports" / "leaderboard.csv")  # scoring reproduces the eval stage's FD
    fgd = board[(board["model"] == "distill@fgd") & (board["sampler"] == "onestep")]["fd"].iloc[0]
    assert score(smoke_repo, [smoke_repo / "models" / "distill@fgd"])[0] == pytest.approx(fgd, rel=1e-4)
    assert results["term_off"]["fd"] != pytest.approx(fgd, rel=1e-6)  # the guidance term was really off
    for k in (1, 2, 4):  # each DMD2 ensemble and its pre-GAN self: K routed students, and the GAN phase moved them
        before_gan = tmp_path / f"ablation-0-dmd_k{k}" / "models" / "msd@ensemble-before-gan"
        assert len(load_model(before_gan).meta["groups"]) == k
        assert results[f"dmd_k{k}"]["fd"] != pytest.approx(results[f"dmd_k{k}_before_gan"]["fd"], rel=1e-6)
