"""Device slots: one Prefect global concurrency limit per host, plus a host-wide pool of device indices.

The limit says *how many* stages may hold a device at once (across every flow run on this host: Prefect
limits are server-wide, so the name carries the host). The pool says *which* device a stage gets: one
lock file per device under the temp dir, held with `flock` while the stage runs, so two flow runs on the
same host never hand out the same GPU. On CPU a "device" is a slot of `threads` cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Slots:
    """What this host offers: `devices` are CUDA indices ("0", "1", …) or CPU slot names ("cpu0", …)."""

    devices: tuple[str, ...]
    threads: int  # torch / OpenMP threads per stage
    gpu: bool

    @property
    def size(self) -> int:
        return len(self.devices)

    def env(self, device: str) -> dict[str, str]:
        """What a stage holding `device` sees: its own GPU (or none) and its share of the cores."""
        threads = str(self.threads)
        return {
            "CUDA_VISIBLE_DEVICES": device if self.gpu else "",
            "SLIMSTEP_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        }

    def describe(self) -> str:
        kind = f"GPU {', '.join(self.devices)}" if self.gpu else "CPU"
        return f"{self.size} slot(s) on {kind}, {self.threads} thread(s) per stage"


def visible_gpus() -> list[str]:
    """CUDA indices this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [d.strip() for d in declared.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True
    )  # fmt: skip
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def plan_slots(
    gpus: int | None = None,
    slots: int | None = None,
    threads: int | None = None,
    width: int | None = None,
    cores: int | None = None,
) -> Slots:
    """Size the slots: GPUs found (or the first `gpus` of them); on CPU, cores ÷ threads per stage.

    `width` (how many stages the DAG could run at once) picks the CPU default: enough slots for the
    widest level, the cores shared evenly between them (2 cores → 2 slots of 1 thread). `slots` overrides
    the count (at most one stage at a time with `slots=1`). `gpus=0` forces CPU.
    """
    cores = cores or os.cpu_count() or 1
    found = visible_gpus() if gpus != 0 else []
    if gpus is not None and gpus > len(found):
        raise ValueError(f"--gpus {gpus} asked for, but this host shows {len(found)} GPU(s): {found or 'none'}")
    if found:
        devices = found[: gpus or len(found)]
        if slots is not None:
            devices = devices[:slots]
        return Slots(tuple(devices), threads or max(1, cores // len(devices)), gpu=True)
    if threads is None:
        threads = max(1, cores // max(1, min(cores, slots or width or cores)))
    count = slots or max(1, cores // threads)
    return Slots(tuple(f"cpu{i}" for i in range(count)), threads, gpu=False)


def limit_name(host: str | None = None) -> str:
    """`slimstep-devices-<host>`: Prefect limits are server-wide, so each host gets its own."""
    host = re.sub(r"[^a-z0-9-]+", "-", (host or socket.gethostname()).lower()).strip("-")
    return f"slimstep-devices-{host or 'localhost'}"


def ensure_limit(name: str, size: int, held: int | None = None) -> int:
    """Create or resize the global concurrency limit (`concurrency(strict=True)` refuses a missing one).

    `held`: devices this host's processes hold right now (`DevicePool.held`). Slots counted beyond that
    were left by a process that died holding them (kill -9, a restarted Prefect server whose in-memory
    leases are gone): they are released, else every later run would wait for them forever. Returns how
    many were released.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, size)
        if held is None:
            return 0
        active = client.read_global_concurrency_limit_by_name(name).active_slots
        if active > held:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=held))
            return active - held
    return 0


class DevicePool:
    """Host-wide: one `flock`ed file per device, so concurrent flow runs on this host share the devices."""

    def __init__(self, devices: tuple[str, ...], folder: Path | None = None, poll_s: float = 0.2) -> None:
        self.devices = devices
        self.folder = folder or Path(tempfile.gettempdir()) / limit_name()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self._fds: dict[str, int] = {}

    def fd(self, device: str) -> int:
        """The held lock file of `device`: pass it to the stage process, so the device stays taken while the
        stage lives even if this process is killed (the flock belongs to the open file, shared by both)."""
        return self._fds[device]

    def held(self) -> int:
        """How many of the devices some live process holds right now."""
        busy = 0
        for device in self.devices:
            with open(self.folder / f"{device}.lock", "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    busy += 1
                else:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        return busy

    @contextlib.contextmanager
    def take(self, stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Hold a free device until the block ends (waits while all are taken; the process dying frees it).

        `stop()` turning true ends the wait with RuntimeError (a cancelled flow run).
        """
        while True:
            if stop is not None and stop():
                raise RuntimeError("stopped while waiting for a free device")
            for device in self.devices:
                handle = open(self.folder / f"{device}.lock", "a")  # noqa: SIM115 - held across the yield
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                self._fds[device] = handle.fileno()
                try:
                    yield device
                finally:
                    self._fds.pop(device, None)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()
                return
            time.sleep(self.poll_s)
