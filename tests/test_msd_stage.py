"""Stages `msd@<k>` and `router` on the smoke repository: the ensemble loads, routes, samples and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import load_split
from pipeline.flow import EPS
from pipeline.modelio import load_model, load_weights
from pipeline.msd import partition_classes
from stages.msd import BEFORE_GAN, class_means
from tests.conftest import run
from tests.test_chain import edit_params, ran_stages

pytestmark = pytest.mark.slow


def test_router_sends_each_label_to_the_student_that_owns_it(smoke_repo: Path) -> None:
    ensemble = load_model(smoke_repo / "models/msd@ensemble")
    students = [load_model(smoke_repo / f"models/msd/{k}") for k in range(2)]
    assert ensemble.meta["kind"] == "router" and ensemble.name == "msd@ensemble"
    assert ensemble.meta["groups"] == [s.meta["classes"] for s in students] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert {s.meta["kind"] for s in students} == {"onestep"}
    g = torch.Generator().manual_seed(0)
    label = torch.arange(10).repeat(3)[torch.randperm(30, generator=g)]  # classes of both students, mixed
    z, t = torch.randn(30, 1, 8, 8, generator=g), torch.full((30,), EPS)
    v = ensemble.net(z, t, label)
    for student in students:
        own = torch.isin(label, torch.tensor(student.meta["classes"]))
        torch.testing.assert_close(v[own], student.net(z[own], t[own], label[own]))
    # The students differ, so the check above could tell a wrong route from a right one.
    assert not torch.allclose(students[0].net(z, t, label), students[1].net(z, t, label), atol=1e-3)


def test_sample_command_samples_the_ensemble(smoke_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.npz"
    result = run(["slimstep", "sample", "msd@ensemble", "--n", "10", "--out", str(out)], smoke_repo)
    assert "NFE 1" in result.stdout
    arrays = np.load(out)
    assert arrays["images"].shape == (10, 1, 8, 8) and np.isfinite(arrays["images"]).all()
    assert sorted(arrays["labels"]) == list(range(10))


def test_dmd_students_with_tsm_and_gan_resume_after_a_kill_and_match_a_clean_run(smoke_copy: Path) -> None:
    msd = {"objective": "dmd", "tsm_steps": 20, "steps": 20, "gan_steps": 6, "partition": "kmeans", "partition_seed": 1}
    for key, value in msd.items():
        edit_params(smoke_copy, "msd", key, value)
    marker = smoke_copy / "fail-once"
    env = {"SLIMSTEP_FAIL_ONCE": f"msd@0:{marker}"}  # dies halfway through its TSM run
    failed = run(["dvc", "repro", "router"], smoke_copy, env=env, check=False)
    assert failed.returncode != 0 and marker.exists()
    assert len(list((smoke_copy / "scratch/msd-0").glob("*/checkpoint.pt"))) == 1
    assert {"msd@0", "router"} <= ran_stages(run(["dvc", "repro", "router"], smoke_copy, env=env).stdout)
    assert not (smoke_copy / "scratch/msd-0").exists()

    resumed = (smoke_copy / "models/msd/0/model.pt").read_bytes()
    run(["dvc", "repro", "-f", "-s", "msd@0"], smoke_copy)
    assert (smoke_copy / "models/msd/0/model.pt").read_bytes() == resumed

    train = load_split(smoke_copy / "data").train
    groups = partition_classes(10, 2, "kmeans", class_means(train), seed=1)
    assert load_model(smoke_copy / "models/msd@ensemble").meta["groups"] == groups
    for k, group in enumerate(groups):
        metrics = json.loads((smoke_copy / f"metrics/msd-{k}.json").read_text())
        assert metrics["classes"] == group and metrics["tsm_final_loss"] > 0 and metrics["final_loss"] > 0
        assert metrics["gan_final_loss"] > 0 and metrics["init"] == "random"  # smoke's student is not the teacher
        assert json.loads((smoke_copy / f"models/msd/{k}/meta.json").read_text())["objective"] == "dmd"
        folder = smoke_copy / f"models/msd/{k}"
        before, after = load_weights(folder, BEFORE_GAN), load_weights(folder)
        assert before.keys() == after.keys()  # the DM phase's student, which the GAN phase then moved
        assert any(not torch.equal(before[name], after[name]) for name in before)
