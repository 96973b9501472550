"""What the runner hands every benchmark: mode, seed, inputs, a scratch folder and temp projects.

Benchmarks never run DVC in the checkout: they make throw-away projects with the test suite's own
`tests/conftest.make_project` (the tracked files copied, a fresh git + DVC repository, its own MLflow DB).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.common import ROOT

QUIET_ENV = {"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
BIN = Path(sys.executable).parent


def _conftest() -> ModuleType:
    """tests/conftest.py as a module (tests/ is not a package), for its `make_project` and `run`."""
    spec = importlib.util.spec_from_file_location("slimstep_tests_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment subprocesses get: telemetry off, the venv's tools first on PATH."""
    return {**os.environ, **QUIET_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


def timed(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None, check: bool = True) -> float:
    """Wall seconds of one subprocess; a failure raises with the end of its output."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env(extra_env), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    return wall


@dataclass
class Context:
    quick: bool
    seed: int
    workdir: Path  # scratch for this run; deleted by the runner
    results: Path
    threads: int
    repo: Path | None = None  # a finished digits run (models/teacher, models/distill@fgd, ...)
    runs: list[Path] = field(default_factory=list)  # finished runs for the quality table
    variants: list[str] = field(default_factory=list)  # ablation variants the quality benchmark runs (empty: all)
    timings: dict[str, float] = field(default_factory=dict)  # shared set-up costs (smoke chain)
    _smoke: tuple[Path, float, Any, subprocess.Popen] | None = field(default=None, repr=False)

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    def repeats(self, quick: int = 5, full: int = 9) -> int:
        return quick if self.quick else full

    def make_project(self, name: str, profile: str = "smoke") -> Path:
        os.environ.update(QUIET_ENV)
        return _conftest().make_project(self.workdir / name, profile)

    def start_smoke_run(self) -> None:
        """Start the shared smoke chain in the background (one thread per stage), so that benchmarks whose
        figures are same-run ratios can run meanwhile; `smoke_run` waits for it."""
        if self._smoke is not None or "smoke_run" in self.__dict__:
            return
        repo = self.make_project("smoke")
        log = (self.workdir / "smoke-chain.log").open("w")
        self._smoke = (repo, time.perf_counter(), log, subprocess.Popen(
            ["slimstep", "repro"], cwd=repo, env=env({"SLIMSTEP_THREADS": "1"}), stdout=log, stderr=subprocess.STDOUT,
        ))  # fmt: skip

    @cached_property
    def smoke_run(self) -> Path:
        """One finished smoke chain (`slimstep repro` in a temp project), built once and shared."""
        self.start_smoke_run()
        repo, started, log, process = self._smoke  # type: ignore[misc]
        code = process.wait()
        log.close()
        self.timings["smoke_chain_s"] = round(time.perf_counter() - started, 1)
        if code != 0:
            tail = (self.workdir / "smoke-chain.log").read_text()[-2500:]
            raise RuntimeError(f"the smoke chain failed ({code}):\n{tail}")
        return repo

    def smoke_running(self) -> bool:
        return self._smoke is not None and self._smoke[3].poll() is None

    def stop(self) -> None:
        """End a smoke chain still running (the runner's clean-up after a failure)."""
        if self._smoke is not None and self._smoke[3].poll() is None:
            self._smoke[3].terminate()
            self._smoke[3].wait()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "seed": self.seed, "threads": self.threads,
                "repo": str(self.repo) if self.repo else None, "runs": [str(r) for r in self.runs],
                **({"variants": self.variants} if self.variants else {})}  # fmt: skip
