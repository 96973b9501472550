"""One DVC stage as one process group: `dvc --wait-for-lock repro --single-item <stage>`.

Each stage starts in a new session (its own process group), so cancelling a flow run can kill DVC *and*
the stage command it spawned (`killpg`), while a Ctrl-C aimed at the flow never half-kills a stage
behind the flow's back. Every live group is registered here; `cancel_all()` is what the flow calls when it
is cancelled, crashes or is interrupted: it kills them all and stops any stage from starting or retrying.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TAIL_LINES = 40
_LIVE: dict[int, subprocess.Popen] = {}
_LIVE_LOCK = threading.Lock()
_CANCELLED = threading.Event()  # set when the flow run is cancelled: no new stage starts, none retries


class StageCancelled(RuntimeError):
    """The flow run was cancelled before this stage could start."""


@dataclass
class StageRun:
    """What one attempt of one stage did."""

    stage: str
    returncode: int
    outcome: str  # "ran" | "restored" (from the run-cache) | "up to date" | "failed"
    seconds: float
    started: float  # time.time() at start / end: tests compare overlaps between stages
    ended: float
    log: Path
    tail: list[str] = field(default_factory=list)

    def tail_text(self) -> str:
        return "".join(self.tail).rstrip()


def dvc(*args: str) -> list[str]:
    """The DVC of this interpreter (`python -m dvc`), waiting for the repo lock instead of failing on it."""
    return [sys.executable, "-m", "dvc", "--wait-for-lock", *args]


def repro_command(stage: str, pull: bool = False) -> list[str]:
    """`--single-item`: siblings sharing an upstream stage must not each try to reproduce it."""
    return dvc("repro", "--single-item", *(["--pull"] if pull else []), stage)


def stale_stages(root: Path) -> set[str] | None:
    """Stages `dvc status` reports as changed (None if it cannot tell: then every stage runs `repro`)."""
    done = subprocess.run(dvc("status", "--json"), cwd=root, capture_output=True, text=True)
    try:
        return set(json.loads(done.stdout or "{}")) if done.returncode == 0 else None
    except json.JSONDecodeError:
        return None


def outcome_of(stage: str, output: str) -> str:
    quoted = re.escape(stage)
    if re.search(rf"Running stage '{quoted}'", output):
        return "ran"
    if re.search(rf"Stage '{quoted}' is cached", output):
        return "restored"
    return "up to date"


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the stage's whole process group, SIGKILL what is left after `grace_s`; wait until it is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.time() + grace_s
        while time.time() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # reap the leader, so the group can disappear
            if not _group_alive(proc.pid):
                return


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group; zombies wait for a reaper but hold nothing."""
    proc_fs = Path("/proc")
    if not proc_fs.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc_fs.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, …
            return True
    return False


def kill_all() -> int:
    """Kill every stage process group still running in this process; returns how many there were."""
    with _LIVE_LOCK:
        live = list(_LIVE.values())
    for proc in live:
        kill_group(proc)
    return len(live)


def cancel_all() -> int:
    """The flow run is going away: start nothing more, kill what runs."""
    _CANCELLED.set()
    return kill_all()


def cancelled() -> bool:
    return _CANCELLED.is_set()


def reset() -> None:
    """A new flow run in this process (tests run several) starts uncancelled."""
    _CANCELLED.clear()


def live_groups() -> list[int]:
    with _LIVE_LOCK:
        return list(_LIVE)


def run_stage(
    stage: str,
    cwd: Path,
    env: dict[str, str],
    log: Path,
    command: list[str] | None = None,
    on_line: Callable[[str], None] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> StageRun:
    """Run the stage's DVC command in its own process group, teeing output to `log` and `on_line`.

    `pass_fds`: open files the stage inherits (its device's lock, held for as long as the stage lives)."""
    if cancelled():
        raise StageCancelled(f"flow run cancelled before stage {stage} started")
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    seen: list[str] = []
    started = time.time()
    proc = subprocess.Popen(
        command or repro_command(stage), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, start_new_session=True, pass_fds=pass_fds,
    )  # fmt: skip
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    try:
        with open(log, "w") as sink:
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                tail.append(line)
                if "stage" in line.lower():
                    seen.append(line)  # DVC's own lines: enough to tell ran / restored / up to date
                if on_line:
                    on_line(line.rstrip("\n"))
        code = proc.wait()
    except BaseException:
        kill_group(proc)  # cancelled, interrupted or crashed while the stage ran: take the group with us
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.pop(proc.pid, None)
    outcome = "failed" if code else outcome_of(stage, "".join(seen))
    return StageRun(stage, code, outcome, time.time() - started, started, time.time(), log, list(tail))
