"""The cache never lies: each stage's dvc.yaml deps and params are exactly the project code it imports and the
params.yaml keys it reads, traced by running every stage of the smoke chain (tests/stage_tracer.py).

Code: every imported file under pipeline/ or stages/ must be covered by a dep (the file or a folder above it),
and every code dep must cover at least one imported file. Params: every key read must be covered by a listed
key (itself or a section above it), and every listed key must cover at least one read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

CODE_DIRS = ("pipeline/", "stages/")
TRACER = ROOT / "tests" / "stage_tracer.py"


@dataclass(frozen=True)
class Declared:
    """One stage as DVC resolved dvc.yaml (foreach expanded)."""

    name: str
    argv: list[str]
    code: list[str]
    params: list[str]


def declared_stages(repo: Path) -> list[Declared]:
    from dvc.repo import Repo

    out = []
    for stage in Repo(str(repo)).index.stages:
        code, params = [], []
        for dep in stage.deps:
            if type(dep).__name__ == "ParamsDependency":
                params += list(dep.params or [])
            elif dep.def_path.startswith(CODE_DIRS):
                code.append(dep.def_path.rstrip("/"))
        prefix = "python -m stages "
        assert stage.cmd.startswith(prefix), f"{stage.name}: cmd {stage.cmd!r} is not `{prefix}NAME [ARG]`"
        out.append(Declared(stage.name, stage.cmd.removeprefix(prefix).split(), code, params))
    return out


def covers(entry: str, item: str, sep: str) -> bool:
    return item == entry or item.startswith(entry + sep)


def problems(stage: Declared, modules: list[str], reads: list[str]) -> list[str]:
    """Every disagreement between what the stage declares and what it did, with the line to change."""
    found = [*mismatches(stage.code, modules, "/", "imports {} but no dep covers it: add `{}` to its deps",
                         "lists dep {} but never imports anything under it: remove it"),
             *mismatches(stage.params, reads, ".", "reads params key {} but does not list it: add `{}` to its params",
                         "lists params key {} but never reads it: remove it")]  # fmt: skip
    return [f"{stage.name}: {line}" for line in found]


def mismatches(listed: list[str], used: list[str], sep: str, missing: str, unused: str) -> list[str]:
    return [*(missing.format(item, item) for item in used if not any(covers(e, item, sep) for e in listed)),
            *(unused.format(entry) for entry in listed if not any(covers(entry, i, sep) for i in used))]  # fmt: skip


def trace(repo: Path, stage: Declared, out: Path) -> dict[str, list[str]]:
    env = {**os.environ, "SLIMSTEP_TRACKING": "off", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(TRACER), str(out), *stage.argv], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"{stage.name} failed under the tracer:\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_stage_declares_exactly_the_code_and_params_it_uses(smoke_copy: Path, tmp_path: Path) -> None:
    stages = declared_stages(smoke_copy)
    with ThreadPoolExecutor(max_workers=2) as pool:
        traced = list(pool.map(lambda s: trace(smoke_copy, s, tmp_path / f"{s.name}.json"), stages))
    found = [line for stage, seen in zip(stages, traced, strict=True)
             for line in problems(stage, seen["modules"], seen["params"])]  # fmt: skip
    assert not found, "dvc.yaml disagrees with what the stages do:\n  " + "\n  ".join(found)


# The comparison itself, on the misses this test exists to catch.
NAIVE = Declared("distill@naive", ["distill", "naive"], ["stages/distill.py", "pipeline/nets"],
                 ["distill", "anneal.steps", "anneal.net"])  # fmt: skip


def test_a_param_read_but_not_listed_is_named_with_the_line_to_add() -> None:
    found = problems(NAIVE, ["stages/distill.py", "pipeline/nets/mlp.py"],
                     ["distill.steps", "anneal.steps", "anneal.net.width", "anneal.lr", "anneal.warmup_steps"])
    assert found == ["distill@naive: reads params key anneal.lr but does not list it: add `anneal.lr` to its params",
                     "distill@naive: reads params key anneal.warmup_steps but does not list it: add "
                     "`anneal.warmup_steps` to its params"]  # fmt: skip


def test_an_imported_module_without_a_dep_is_named_and_an_unused_dep_too() -> None:
    found = problems(NAIVE, ["stages/distill.py", "pipeline/flow.py"], ["distill.lr", "anneal.steps", "anneal.net"])
    assert "distill@naive: imports pipeline/flow.py but no dep covers it: add `pipeline/flow.py` to its deps" in found
    assert "distill@naive: lists dep pipeline/nets but never imports anything under it: remove it" in found
    assert len(found) == 2


def test_a_section_covers_its_keys_but_not_a_sibling_with_a_longer_name() -> None:
    stage = Declared("x", [], [], ["pairs.seed"])
    assert problems(stage, [], ["pairs.seed"]) == []
    assert problems(stage, [], ["pairs.seeds"])[0].startswith("x: reads params key pairs.seeds")
