"""`benchmarks/meanflow_curve.py` on the smoke repository: training in chunks ends at the stage's own model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pipeline.modelio import load_model
from tests.conftest import run

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "meanflow_curve.py"
ONE_THREAD = {"SLIMSTEP_THREADS": "1", "SLIMSTEP_TRACKING": "off"}  # bit-identical weights need equal threads


def test_the_curve_s_last_point_is_the_meanflow_stage_s_model(smoke_copy: Path) -> None:
    shutil.rmtree(smoke_copy / "models/meanflow")
    shutil.rmtree(smoke_copy / "scratch", ignore_errors=True)
    run([sys.executable, "-m", "stages", "meanflow"], smoke_copy, env=ONE_THREAD)
    out = smoke_copy / "curve.json"
    run([sys.executable, str(SCRIPT), str(out), "--every", "50"], smoke_copy, env=ONE_THREAD)

    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == [50, 100]  # the smoke profile's 100 meanflow steps, two chunks
    assert all(r["fd"] > 0 and 0 <= r["recall"] <= 1 for r in rows)
    stage = load_model(smoke_copy / "models/meanflow").net.state_dict()
    chunked = load_model(smoke_copy / "curve.work/model").net.state_dict()
    assert stage.keys() == chunked.keys()
    assert all(torch.equal(stage[k], chunked[k]) for k in stage)  # resumed chunks = one uninterrupted run

    plot = smoke_copy / "curve.png"
    run([sys.executable, str(SCRIPT), "--plot", str(plot), str(out)], smoke_copy)
    assert plot.stat().st_size > 10_000
