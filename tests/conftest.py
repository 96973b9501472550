"""Shared fixtures: the smoke repository is built once per test session and copied for each test that needs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOOKS = Path(__file__).resolve().parent / "hooks"
# What a fresh clone holds (the tracked project), without outputs, caches or the venv.
PROJECT_FILES = ["pyproject.toml", "dvc.yaml", "params.yaml", "Makefile", ".dvcignore", ".gitignore",
                 "configs", "pipeline", "stages", "inputs", "benchmarks"]  # fmt: skip


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_small() -> None:
    """Tiny unit-test tensors run faster on one thread; keep telemetry off everywhere."""
    torch.set_num_threads(1)
    os.environ.update(
        DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true"
    )
    # Every Python process the tests start loads tests/hooks/sitecustomize.py (SLIMSTEP_FAIL_ONCE faults).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH")) if p)


def run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def make_project(dest: Path, profile: str = "smoke") -> Path:
    """A git + DVC repository holding the project's tracked files, switched to `profile`, MLflow in its own DB."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        elif source.exists():
            shutil.copy2(source, dest / name)
    (dest / ".dvc").mkdir()
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copy2(ROOT / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], dest)
    run(["slimstep", "profile", profile], dest)
    return dest


def stage_commands(repo: Path) -> list[list[str]]:
    """Every stage's `python -m stages NAME [ARG]` arguments, in DAG order (as DVC resolves dvc.yaml)."""
    from dvc.repo import Repo

    from pipeline.orchestration.dag import read_graph

    cmds = {stage.name: stage.cmd.split()[3:] for stage in Repo(str(repo)).index.stages}
    return [cmds[name] for name in read_graph(repo).order()]


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """The one Prefect server of the test session (starting one costs ~10 s, more on a busy machine)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """The smoke chain, run once through `slimstep run` (the Prefect flow: an MLflow parent run, a child per stage)."""
    repo = make_project(tmp_path_factory.mktemp("smoke") / "repo")
    run(["slimstep", "run"], repo, env={"PREFECT_API_URL": prefect_api})
    return repo


@pytest.fixture
def smoke_copy(smoke_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the finished smoke repository (DVC cache, lock and MLflow DB included)."""
    dest = tmp_path / "repo"
    shutil.copytree(smoke_repo, dest, symlinks=True)
    return dest
