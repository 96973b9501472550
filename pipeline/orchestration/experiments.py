"""Experiments: a flow run with parameter overrides, in its own git worktree that shares the DVC cache.

Why a git worktree rather than `dvc exp run`: the flow schedules stages itself (`dvc repro --single-item`
per stage, in parallel, one device slot each), and `dvc exp run` runs the whole pipeline as one process.
A worktree at `scratch/experiments/<name>` is a full checkout of HEAD with its own `params.yaml`, its
own outputs and its own `dvc.lock`, so two experiments launched together never touch each other's
files, nor the checkout's. Its `.dvc/config.local` points at the checkout's cache, so unchanged stages
are restored from the shared run-cache instead of recomputed. At the end `dvc exp save` records it as a
DVC experiment, listed by `dvc exp show` in the checkout.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ParamsError, validate_params

EXPERIMENTS = Path("scratch/experiments")  # git- and dvc-ignored, like the rest of scratch/


class OverrideError(ValueError):
    """An override names no key of params.yaml, or gives a value the schema refuses."""


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`teacher.lr=0.002` → {"teacher.lr": 0.002}: values are numbers, lists, true/false or text."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OverrideError(f"--set {item!r}: expected KEY=VALUE, e.g. teacher.lr=0.002")
        overrides[key.strip()] = _value(value)
    return overrides


def _value(text: str) -> Any:
    """JSON first (YAML 1.1 reads `2e-3` as a string), then YAML (`[euler-1, heun-2]`, bare words)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with each dotted key set; a key must already exist (a typo never adds a new one)."""
    updated = copy.deepcopy(params)
    for dotted, value in overrides.items():
        node, parts = updated, dotted.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:depth]) or "params.yaml"
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
                raise OverrideError(f"override {dotted!r}: {where} has no key {part!r}; keys there: {known}")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return updated


def validated(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The overridden parameters, checked against the schema: one message naming the key and the rule."""
    updated = apply_overrides(params, overrides)
    try:
        validate_params(updated, f"params.yaml with overrides {overrides}")
    except ParamsError as exc:
        raise OverrideError(str(exc)) from None
    return updated


def workspace_name(run_name: str) -> str:
    """A folder and git-ref friendly name from a Prefect flow-run name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-.") or "experiment"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def remove_workspace(root: Path, path: Path) -> None:
    """Drop a worktree that never ran (its overrides were refused)."""
    _git(root, "worktree", "remove", "--force", str(path))


def create_workspace(root: Path, name: str, params: dict[str, Any]) -> Path:
    """A detached worktree of HEAD under scratch/experiments/, using the checkout's DVC cache, with `params`."""
    path = root / EXPERIMENTS / name
    if path.exists():
        raise OverrideError(f"{path} exists already: remove it (`git worktree remove {path}`) or pick another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    made = _git(root, "worktree", "add", "--detach", str(path), "HEAD")
    if made.returncode:
        raise OverrideError(f"cannot create the experiment's git worktree: {made.stderr.strip()}")
    cache = subprocess.run(
        [sys.executable, "-m", "dvc", "cache", "dir"], cwd=root, capture_output=True, text=True
    ).stdout.strip() or str(root / ".dvc" / "cache")  # fmt: skip
    (path / ".dvc").mkdir(exist_ok=True)
    (path / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {Path(cache).resolve()}\n")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def save_experiment(path: Path, name: str) -> str:
    """`dvc exp save`: the finished workspace becomes a DVC experiment (`dvc exp show` lists it); "" if it cannot."""
    saved = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "save", "--force", "-n", name], cwd=path, capture_output=True, text=True
    )  # fmt: skip
    return name if saved.returncode == 0 else ""
