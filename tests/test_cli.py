"""The `slimstep` commands in a throwaway git repository: profiles, validation, import, sampling, cleaning, help."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from click.testing import Result
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.modelio import save_model
from pipeline.nets import NetSpec, build_net
from pipeline.profiles import render, render_text

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """configs/, inputs/ and params.yaml (the digits profile), committed; the working directory for the test."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(ROOT / "configs", root / "configs")
    (root / "inputs").mkdir()
    shutil.copy2(ROOT / "inputs/README.md", root / "inputs/README.md")
    (root / "params.yaml").write_text(render_text("digits", root / "configs"))
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    monkeypatch.chdir(root)
    return root


def cli(*args: str) -> Result:
    return runner.invoke(app, list(args))


def said(result: Result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def edit_params(section: str, key: str, value: object) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params[section][key] = value
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# Profiles.
def test_profile_writes_the_profile_file(repo: Path) -> None:
    result = cli("profile", "smoke")
    assert result.exit_code == 0, result.output
    assert (repo / "params.yaml").read_text() == render_text("smoke", repo / "configs")
    assert "configs/smoke.yaml" in said(result)
    # An uncommitted params.yaml that equals a saved profile is not an edit: switching again is allowed.
    assert cli("profile", "toy2d").exit_code == 0
    assert (repo / "params.yaml").read_text() == render_text("toy2d", repo / "configs")


def test_profile_refuses_to_overwrite_hand_edits_and_names_them(repo: Path) -> None:
    edit_params("teacher", "lr", 0.00123)
    edit_params("eval", "knn_k", 7)
    edited = (repo / "params.yaml").read_bytes()
    result = cli("profile", "digits")
    assert result.exit_code == 2
    text = said(result)
    assert "uncommitted edits" in text and "eval.knn_k, teacher.lr" in text and "--force" in text
    assert (repo / "params.yaml").read_bytes() == edited
    forced = cli("profile", "digits", "--force")
    assert forced.exit_code == 0, forced.output
    assert (repo / "params.yaml").read_text() == render_text("digits", repo / "configs")


def test_committed_edits_may_be_replaced(repo: Path) -> None:
    edit_params("teacher", "lr", 0.00123)
    git(repo, "commit", "-qam", "tune lr")
    assert cli("profile", "smoke").exit_code == 0


def test_unknown_profile_lists_the_available_ones(repo: Path) -> None:
    before = (repo / "params.yaml").read_bytes()
    result = cli("profile", "imagenet")
    assert result.exit_code == 2
    assert "no profile 'imagenet'; available: cifar10, digits, mnist, mnist-unet, smoke, toy2d" in said(result)
    assert (repo / "params.yaml").read_bytes() == before


def test_profile_over_unparseable_params_refuses_cleanly(repo: Path) -> None:
    (repo / "params.yaml").write_text("teacher: [oops\n")
    result = cli("profile", "digits")
    assert result.exit_code == 2 and "--force" in said(result)


# Validation.
def test_validate_accepts_every_profile(repo: Path) -> None:
    for name in ("smoke", "digits", "toy2d", "cifar10"):
        (repo / "params.yaml").write_text(render_text(name, repo / "configs"))
        result = cli("validate")
        assert result.exit_code == 0 and f"params.yaml is valid (profile {name})" in said(result)


def test_validate_names_the_bad_key_value_and_rule(repo: Path) -> None:
    edit_params("teacher", "lr", "fast")
    edit_params("eval", "knn_kk", 3)
    result = cli("validate")
    assert result.exit_code == 2
    text = said(result)
    assert "error: params.yaml: invalid parameters" in text
    assert "teacher.lr = 'fast': Input should be a valid number" in text
    assert "eval.knn_kk: unknown key" in text


def test_validate_without_params_says_how_to_make_them(repo: Path) -> None:
    (repo / "params.yaml").unlink()
    result = cli("validate")
    assert result.exit_code == 2 and "not found (write one with `slimstep profile digits`)" in said(result)


def test_validate_prints_yaml_errors_verbatim(repo: Path) -> None:
    (repo / "params.yaml").write_text("teacher: [oops\n")
    result = cli("validate")
    assert result.exit_code == 2
    assert "teacher: [oops" in result.output and "expected ',' or ']'" in result.output


# Help.
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_every_command_is_listed_in_the_top_level_help() -> None:
    assert set(COMMANDS) >= {"profile", "validate", "repro", "sample", "import-data", "clean"}
    result = cli("--help")
    assert result.exit_code == 0
    assert all(name in result.output for name in COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name: str) -> None:
    result = cli(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and name in result.output
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    assert command.help and command.help.split()[0][0].isupper()  # a docstring that says what it does


# Importing data.
def test_import_data_copies_an_npz_and_points_params_at_it(repo: Path, tmp_path: Path) -> None:
    source = tmp_path / "mine.npz"
    np.savez(source, images=np.zeros((10, 1, 4, 4), np.uint8), labels=np.arange(10) % 2)
    result = cli("import-data", str(source))
    assert result.exit_code == 0, result.output
    assert (repo / "inputs/mine.npz").read_bytes() == source.read_bytes()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["dataset"] == "npz" and params["data"]["path"] == "inputs/mine.npz"
    assert params["teacher"] == render("digits", repo / "configs")["teacher"]
    assert cli("validate").exit_code == 0  # the relative path passes the schema
    refused = cli("profile", "smoke")  # the import is an edit like any other
    assert refused.exit_code == 2 and "data.dataset, data.path" in said(refused)


def test_import_data_copies_a_cifar_folder(repo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "test_batch"):
        (folder / name).write_bytes(name.encode())
    result = cli("import-data", str(folder))
    assert result.exit_code == 0, result.output
    assert (repo / "inputs/cifar-10-batches-py/test_batch").read_bytes() == b"test_batch"
    data = yaml.safe_load((repo / "params.yaml").read_text())["data"]
    assert (data["dataset"], data["path"]) == ("cifar10", "inputs/cifar-10-batches-py")


def test_import_data_refuses_missing_or_unknown_sources(repo: Path, tmp_path: Path) -> None:
    before = (repo / "params.yaml").read_bytes()
    missing = cli("import-data", str(tmp_path / "nope.npz"))
    assert missing.exit_code == 2 and "nope.npz: no such file or folder" in said(missing)
    (tmp_path / "data.csv").write_text("1,2\n")
    wrong = cli("import-data", str(tmp_path / "data.csv"))
    assert wrong.exit_code == 2
    assert "expected an image folder, a folder of CIFAR-10 python batches or an .npz file" in said(wrong)
    assert (repo / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in (repo / "inputs").iterdir()) == ["README.md"]


def test_import_data_of_a_file_already_in_inputs(repo: Path) -> None:
    np.savez(repo / "inputs/here.npz", images=np.zeros((4, 2)), labels=np.zeros(4, dtype=np.int64))
    result = cli("import-data", "inputs/here.npz")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["path"] == "inputs/here.npz"


# Sampling a saved model.
SPEC = NetSpec(kind="mlp", width=16, depth=1, emb_dim=8)


@pytest.fixture
def model(repo: Path) -> Path:
    torch.manual_seed(0)
    folder = repo / "models/teacher"
    meta = {"stage": "teacher", "kind": "flow", "net": SPEC.model_dump(), "data_shape": [2], "num_classes": 4,
            "default_sampler": "euler-3"}  # fmt: skip
    save_model(folder, build_net(SPEC, (2,), 4), meta)
    return folder


def test_sample_writes_arrays_with_the_asked_labels(model: Path, repo: Path) -> None:
    result = cli("sample", "teacher", "--n", "6", "--labels", "3,1", "--out", "out/s.npz")
    assert result.exit_code == 0, result.output
    assert "with euler-3 (NFE 3)" in said(result)  # the model's own default sampler
    arrays = np.load(repo / "out/s.npz")
    assert arrays["images"].shape == (6, 2) and arrays["labels"].tolist() == [1, 1, 1, 3, 3, 3]
    again = cli("sample", str(model), "--n", "6", "--labels", "3,1", "--out", "t.npz")  # a folder works too
    assert again.exit_code == 0 and np.array_equal(np.load(repo / "t.npz")["images"], arrays["images"])
    other = cli("sample", "teacher", "--n", "6", "--labels", "3,1", "--out", "u.npz", "--seed", "1")
    assert other.exit_code == 0 and not np.array_equal(np.load(repo / "u.npz")["images"], arrays["images"])


def test_sample_sampler_override_and_labels_cycle(model: Path, repo: Path) -> None:
    result = cli("sample", "teacher", "--n", "5", "--out", "s.npz", "--sampler", "heun-2")
    assert result.exit_code == 0 and "with heun-2 (NFE 3)" in said(result)
    assert np.load(repo / "s.npz")["labels"].tolist() == [0, 0, 1, 2, 3]


def test_sample_refuses_unknown_model_and_bad_labels(model: Path) -> None:
    missing = cli("sample", "distill@fgd", "--out", "s.npz")
    assert missing.exit_code == 2 and "not a model folder" in said(missing)
    bad = cli("sample", "teacher", "--labels", "2,4", "--out", "s.npz")
    assert bad.exit_code == 2 and "--labels must lie in 0..3" in said(bad)


def test_sample_refuses_a_bad_sampler_name_cleanly(model: Path) -> None:
    result = cli("sample", "teacher", "--out", "s.npz", "--sampler", "euler-0")
    assert result.exit_code == 2 and "unknown sampler 'euler-0'" in said(result)


# Cleaning.
def test_clean_removes_scratch_and_reports_its_size(repo: Path) -> None:
    checkpoint = repo / "scratch/teacher/0123abcd/checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"\0" * 2_500_000)
    (repo / "models").mkdir()
    result = cli("clean")
    assert result.exit_code == 0 and "removed scratch/ (2.5 MB)" in said(result)
    assert not (repo / "scratch").exists() and (repo / "models").exists() and (repo / "params.yaml").exists()
    again = cli("clean")
    assert again.exit_code == 0 and "(0.0 MB)" in said(again)
