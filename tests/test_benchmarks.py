"""The benchmark runner's pieces (fast): timing and ratios, the result schema, the RAM probe, the claims table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import quality
from benchmarks.common import (
    SCHEMA_KEYS,
    Report,
    interleave,
    markdown_table,
    paired_ratio,
    result_payload,
    text_table,
    write_result,
)
from benchmarks.memprobe import probe
from benchmarks.pairgen import is_flat
from benchmarks.quality import CLAIMS, Claim, RunData, claim_row, one_point_per_model
from benchmarks.run import benchmark_markdown, parse_args, summary_markdown

# Timing and ratios.


def test_interleave_alternates_order_and_times_every_fn() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = interleave(fns, repeats=4, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert set(times) == {"a", "b", "c"} and all(len(t) == 4 and min(t) >= 0 for t in times.values())


def test_interleave_times_fast_calls_in_blocks_and_keeps_results() -> None:
    count = {"n": 0}

    def fast() -> int:
        count["n"] += 1
        return 7

    results: dict[str, int] = {}
    times = interleave({"fast": fast}, repeats=5, warmup=1, min_block_s=0.01, results=results)
    assert results == {"fast": 7}
    assert count["n"] > 6  # each timed block ran many calls
    assert len(times["fast"]) == 5 and max(times["fast"]) < 0.01  # seconds per call, not per block


def test_paired_ratio_is_the_median_of_per_repeat_ratios() -> None:
    # Repeat 3 is slow for both sides (a noisy neighbour): its ratio is still 2, and the outlier ratio 10 is ignored.
    a, b = [2.0, 4.0, 20.0, 2.0, 10.0], [1.0, 2.0, 10.0, 1.0, 1.0]
    assert paired_ratio(a, b) == 2.0
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        interleave({"x": lambda: None}, repeats=0)


# Result files.


def _payload(**figures: float) -> dict:
    report = Report(figures=dict(figures), tables={"t": [{"name": "x", "value": 1.5}]}, summary={"ratio": 2.0})
    report.target("ratio", 2.0, ">= 1", True)
    return result_payload("demo", "quick", 0, 1.234, report)


def test_result_file_has_the_schema_and_valid_json(tmp_path) -> None:
    path = tmp_path / "results" / "demo.json"
    write_result(path, _payload(bad=math.nan, good=1.0))
    data = json.loads(path.read_text())  # strict JSON: NaN became null
    assert all(key in data for key in SCHEMA_KEYS)
    assert data["figures"] == {"bad": None, "good": 1.0}
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["versions"]["torch"]
    assert data["machine"]["git"]["commit"] and data["seed"] == 0 and data["mode"] == "quick"
    assert data["targets"] == [{"target": "ratio", "goal": ">= 1", "value": 2.0, "met": True}]
    assert [p.name for p in path.parent.iterdir()] == ["demo.json"]  # no temp file left behind


def test_result_write_is_atomic_and_checked(tmp_path) -> None:
    path = tmp_path / "demo.json"
    write_result(path, _payload(good=1.0))
    before = path.read_text()
    broken = _payload(good=1.0)
    broken["figures"]["object"] = object()  # not serialisable: fails before anything is written
    with pytest.raises(TypeError):
        write_result(path, broken)
    incomplete = {k: v for k, v in _payload().items() if k != "machine"}
    with pytest.raises(ValueError, match="machine"):
        write_result(path, incomplete)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]


def test_tables_and_summary_render() -> None:
    rows = [{"model": "student", "nfe": 1, "speedup": 431.25, "missing": None}]
    text = text_table(rows)
    assert "student" in text and "431.2" in text and "–" in text
    assert markdown_table(rows).splitlines()[0] == "| model | nfe | speedup | missing |"
    md = summary_markdown({"demo": _payload(good=1.0)}, "quick", 60.0)
    assert "## Targets" in md and "| demo | ratio | >= 1 | 2 | yes |" in md
    args = parse_args(["--quick", "--only", "sampling", "--only", "pairs"])
    assert args.quick and args.only == ["sampling", "pairs"] and args.threads == 1
    assert parse_args(["--only", "deploy"]).only == ["deploy"]
    alone = benchmark_markdown("demo", _payload(good=1.0))  # benchmarks/results/<name>.md: the same section
    assert alone[1] == "# demo" and "| name | value |" in "\n".join(alone) and "## demo" in md


# The RAM probe.


def test_ram_probe_tells_growing_from_flat_memory() -> None:
    small, large = probe({"target": "alloc", "mb": 16}), probe({"target": "alloc", "mb": 160})
    stream_small, stream_large = (
        probe({"target": "stream_alloc", "mb": 16}),
        probe({"target": "stream_alloc", "mb": 160}),
    )
    # This test process holds torch (hundreds of MB): a probe that inherited its high-water mark would read that.
    assert small["peak_kb"] < 64 * 1024
    assert large["growth_kb"] > 100 * 1024 > small["growth_kb"]  # it sees the 144 MB more
    assert not is_flat(small["peak_kb"], large["peak_kb"])
    assert stream_large["seen_mb"] == 10 * stream_small["seen_mb"]
    assert is_flat(stream_small["peak_kb"], stream_large["peak_kb"])


# The claims table.


def _board(fd: dict[str, float], straight: dict[str, float]) -> pd.DataFrame:
    rows = [{"model": "real", "sampler": "data", "nfe": 0, "params": 0, "fd": 1.0, "fd_std": 0.0, "straightness": None}]
    for model, sampler, nfe, params in [
        ("teacher", "euler-1", 1, 900), ("teacher", "dopri5-1e-05", 176, 900),
        ("anneal@reflow", "euler-1", 1, 200), ("anneal@reflow", "dopri5-1e-05", 40, 200),
        ("anneal@slimflow", "euler-1", 1, 200), ("anneal@slimflow", "dopri5-1e-05", 40, 200),
        ("distill@naive-paper", "onestep", 1, 200), ("distill@naive", "onestep", 1, 200),
        ("distill@fgd", "onestep", 1, 200), ("msd@ensemble", "onestep", 1, 400), ("meanflow", "onestep", 1, 210),
    ]:  # fmt: skip
        rows.append({"model": model, "sampler": sampler, "nfe": nfe, "params": params, "fd": fd[f"{model} {sampler}"],
                     "fd_std": 0.1, "straightness": straight.get(model)})  # fmt: skip
    return pd.DataFrame(rows)


def _run(tmp_path, name: str, shift: float, stepper: dict | None) -> RunData:
    fd = {"teacher euler-1": 50.0, "teacher dopri5-1e-05": 2.0, "anneal@reflow euler-1": 9.0,
          "anneal@reflow dopri5-1e-05": 4.0, "anneal@slimflow euler-1": 8.0 + shift,
          "anneal@slimflow dopri5-1e-05": 3.0 + shift, "distill@naive-paper onestep": 6.0, "distill@fgd onestep": 5.0,
          "distill@naive onestep": 4.5,
          "msd@ensemble onestep": 5.5, "meanflow onestep": 4.0 + 2 * shift}  # fmt: skip
    straight = {"teacher": 0.3, "anneal@reflow": 0.05, "anneal@slimflow": 0.04}
    return RunData(tmp_path / name, _board(fd, straight), stepper)


def test_claim_rows_follow_the_sign_of_the_effect(tmp_path) -> None:
    stepper = {"rl": {"nfe": 20.0, "err": 0.002}, "table": {"dopri5-0.0001": {"nfe": 56.0, "err": 0.001}}}
    runs = [_run(tmp_path, "a", 0.0, stepper), _run(tmp_path, "b", 0.5, None)]
    rows = {c.claim: claim_row(c, runs) for c in CLAIMS}

    straight = rows["reflow straightens the flow"]
    assert straight["reproduces"] == "yes" and straight["runs"] == "2/2" and straight["ours_baseline"] == "0.3"
    anneal = rows["annealing beats plain reflow (2-flow, dopri5)"]  # -1.0 and -0.5: mean ± std over the runs
    assert (
        anneal["reproduces"] == "yes" and anneal["delta"] == "-0.75 ± 0.35" and anneal["values"] == [[4, 3], [4, 3.5]]
    )
    paper = rows["flow-guided distillation beats naive distillation (paper's reading)"]  # 6.0 → 5.0 in both runs
    assert paper["reproduces"] == "yes" and paper["per_seed"] == "6 → 5; 6 → 5"
    assert rows["flow-guided distillation beats naive distillation (compute-matched)"]["reproduces"] == "no"
    meanflow = rows["MeanFlow (data only, no teacher) beats naive distillation at equal steps"]  # 4.0, 5.0 vs 4.5
    assert (meanflow["runs"], meanflow["per_seed"]) == ("1/2", "4.5 → 4; 4.5 → 5")
    assert rows["MeanFlow (data only, no teacher) beats FGD"]["values"] == [[5, 4], [5, 5]]
    msd = rows["MSD ensemble beats one student of the same size"]  # 5.5 vs 5.0: worse, the sign does not reproduce
    assert msd["reproduces"] == "no" and msd["runs"] == "0/2"
    nfe, err = rows["RL step control needs fewer NFE than dopri5"], rows["RL step control is as accurate as dopri5"]
    assert (nfe["reproduces"], nfe["runs"]) == ("yes", "1/1")  # run b has no stepper metrics
    assert err["reproduces"] == "no"
    untested = rows["TSM warm start helps half-size students"]  # the runs have no ablations (quick mode)
    assert untested["reproduces"] == "not measured" and "full mode" in untested["why"]

    runs[0].ablations = {"term_off": {"fd": 5.5}, "msd_k5": {"fd": 4.0}, "tsm_off": {"fd": 9.0}, "tsm_on": {"fd": 8.0}}
    rows = {c.claim: claim_row(c, runs) for c in CLAIMS}
    term = rows["2-step guidance term on vs off (same init, teacher pairs)"]  # off 5.5, on: the run's distill@fgd
    assert (term["reproduces"], term["runs"], term["values"]) == ("yes", "1/1", [[5.5, 5.0]])
    assert rows["more MSD students help (K = 1 vs 5)"]["values"] == [[5.0, 4.0]]
    assert rows["TSM warm start helps half-size students"]["values"] == [[9.0, 8.0]]

    runs[0].ablations = {"dmd_k1": {"fd": 30.0}, "dmd_k2": {"fd": 28.0}, "dmd_k1_before_gan": {"fd": 29.0}}
    rows = {c.claim: claim_row(c, runs) for c in CLAIMS}
    assert rows["more DMD2 students help (K = 1 vs 2, GAN phase on)"]["values"] == [[30.0, 28.0]]
    gan = rows["the GAN phase improves DMD2 students (K = 1)"]  # 29 before, 30 after: worse
    assert (gan["values"], gan["reproduces"]) == ([[29.0, 30.0]], "no")
    assert rows["the GAN phase improves DMD2 students (K = 4)"]["reproduces"] == "not measured"

    higher = Claim("x", "p", "m", "fgd", "msd", "higher", lambda r: (1.0, 2.0))
    assert claim_row(higher, runs)["reproduces"] == "yes"


def test_ablations_not_rerun_keep_their_stored_measurement(tmp_path, monkeypatch) -> None:
    table = [{"run": "/r0", "variant": "term_off", "fd": 5.0, "train_s": 1.0},
             {"run": "/r0", "variant": "dmd_k1", "fd": 9.0, "train_s": 2.0},
             {"run": "/r0", "variant": "dmd_k1_before_gan", "fd": 8.0, "train_s": 2.0},
             {"run": "/other", "variant": "term_off", "fd": 7.0, "train_s": 1.0}]  # fmt: skip
    stored = {"tables": {"ablations (student stages re-run in copies of the runs)": table}}
    (tmp_path / "quality.json").write_text(json.dumps(stored))
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    kept = quality.stored_ablations([Path("/r0"), Path("/r1")], rerun={"dmd_k1"})
    assert kept == {"/r0": {"term_off": {"fd": 5.0, "train_s": 1.0}}}  # dmd_k1 and its pre-GAN row are re-run


def test_plot_points_are_one_per_model_at_its_own_sampler(tmp_path) -> None:
    runs = [_run(tmp_path, "a", 0.0, None), _run(tmp_path, "b", 1.0, None)]
    points, floor = one_point_per_model(runs)
    assert floor == 1.0
    chosen = dict(zip(points["model"], points["sampler"], strict=True))
    assert chosen == {"teacher": "dopri5-1e-05", "anneal@reflow": "dopri5-1e-05", "anneal@slimflow": "dopri5-1e-05",
                      "distill@naive-paper": "onestep", "distill@naive": "onestep", "distill@fgd": "onestep",
                      "msd@ensemble": "onestep", "meanflow": "onestep"}  # fmt: skip
    slim = points[points["model"] == "anneal@slimflow"].iloc[0]
    assert slim["fd"] == pytest.approx(3.5) and slim["fd_std"] == pytest.approx(math.sqrt(0.5))  # over runs
