"""One flow per checkout, and no stage outliving its flow.

`one_flow` holds an exclusive `flock` on `.dvc/tmp/slimstep-flow.lock` while `slimstep run` / `repro`
works; a second one refuses at once, naming the first. The kernel drops the lock when its holder dies,
so a killed flow never leaves a stale lock. Stages learn their flow from SLIMSTEP_FLOW (pid and start
time): `stop_with_flow` ends a stage whose flow was killed (kill -9 gives the flow no chance to kill
its stages' process groups), so their device slots are free only once the stages are gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import UserError

LOCK = Path(".dvc/tmp/slimstep-flow.lock")
FLOW_ENV = "SLIMSTEP_FLOW"  # "<pid>:<start time>" of the flow that started this stage


class FlowRunning(UserError):
    """Another slimstep flow holds this checkout."""


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc), so a reused pid is not taken for the flow; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def identity(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{pid}:{start_time(pid) or ''}"


@contextlib.contextmanager
def one_flow(root: Path, command: str) -> Iterator[dict[str, str]]:
    """Hold the checkout's flow lock; yields the env entries that tie stages to this flow."""
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole flow
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another slimstep flow"
        handle.close()
        raise FlowRunning(f"{holder} is already running in {root}; wait for it or stop it, then retry") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"`{command}` (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})\n")
        handle.flush()
        yield {FLOW_ENV: identity()}
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def flow_alive(spec: str) -> bool:
    pid, _, started = spec.partition(":")
    now = start_time(int(pid))
    return now is not None and (not started or now == started)


def stop_with_flow(poll_s: float = 1.0) -> threading.Thread | None:
    """In a stage a flow started: exit (code 143) as soon as that flow is gone; no-op outside a flow."""
    spec = os.environ.get(FLOW_ENV)
    if not spec or not spec.partition(":")[0].isdigit():
        return None

    def watch() -> None:
        while flow_alive(spec):
            time.sleep(poll_s)
        print(f"error: the flow that started this stage (pid {spec.partition(':')[0]}) is gone; stopping",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(143)

    watcher = threading.Thread(target=watch, name="stop-with-flow", daemon=True)
    watcher.start()
    return watcher
