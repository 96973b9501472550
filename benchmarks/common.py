"""What every benchmark shares: interleaved timing, same-run ratios, the result schema, tables.

These machines are shared and noisy, so a speed figure is never a lone number: A and B are timed
alternately in the same run (the order flips every repeat so a slow drift hits both), and the figure is the
median over repeats of the paired ratio A_i / B_i. Absolute times are kept next to it for context only.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1
SCHEMA_KEYS = ("schema_version", "benchmark", "mode", "seed", "created", "wall_s", "machine", "settings",
               "figures", "tables", "summary", "targets", "notes")  # fmt: skip
MIN_REPEATS = 5


# Timing.


def _sync() -> None:
    # CUDA runs asynchronously: without a sync the clock stops before the work is done.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def calibrate(fn: Callable[[], Any], min_block_s: float) -> int:
    """Calls of `fn` per timed block so that one block lasts >= min_block_s (sub-ms calls are timed in bulk)."""
    if min_block_s <= 0:
        return 1
    start = time.perf_counter()
    fn()
    _sync()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, math.ceil(min_block_s / once))


def interleave(
    fns: dict[str, Callable[[], Any]],
    repeats: int = MIN_REPEATS,
    warmup: int = 1,
    min_block_s: float = 0.0,
    results: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every fn, timed alternately: repeat r runs them in order, r + 1 in reverse order.

    Each fn is warmed up `warmup` times (its last warm-up return goes into `results`), then called in blocks
    of as many calls as make >= min_block_s; returns name -> `repeats` per-call times.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            start = time.perf_counter()
            value = fn()
            _sync()
            once = max(time.perf_counter() - start, 1e-7)
            if results is not None:
                results[name] = value
        inner[name] = max(1, math.ceil(min_block_s / once)) if warmup else calibrate(fn, min_block_s)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync()
            start = time.perf_counter()
            for _ in range(inner[name]):
                fns[name]()
            _sync()
            times[name].append((time.perf_counter() - start) / inner[name])
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repeats of numerator_i / denominator_i (both measured in repeat i)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need two equally long, non-empty series, got {len(numerator)} and {len(denominator)}")
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": median(values), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


# Machine and provenance.


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path = ROOT) -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in ("torch", "numpy", "dvc", "mlflow", "prefect", "torchdiffeq")},
        "git": git_commit(),
    }


# Results.


@dataclass
class Report:
    """What one benchmark hands the runner: every figure, the tables it prints, headline numbers, targets."""

    figures: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # the few numbers summary.md shows
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def target(self, name: str, value: float | None, goal: str, met: bool | None) -> None:
        """An issue target: `goal` in words (e.g. '>= 300'), the measured value, whether it is met."""
        self.targets.append({"target": name, "goal": goal, "value": value, "met": met})


def jsonable(value: Any) -> Any:
    """NaN/inf -> None (JSON has neither), tuples -> lists, Paths -> str, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_payload(name: str, mode: str, seed: int, wall_s: float, report: Report) -> dict[str, Any]:
    return jsonable({
        "schema_version": SCHEMA_VERSION,
        "benchmark": name,
        "mode": mode,
        "seed": seed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 2),
        "machine": machine(),
        "settings": report.settings,
        "figures": report.figures,
        "tables": report.tables,
        "summary": report.summary,
        "targets": report.targets,
        "notes": report.notes,
    })  # fmt: skip


def write_result(path: Path, payload: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a result file."""
    missing = [k for k in SCHEMA_KEYS if k not in payload]
    if missing:
        raise ValueError(f"result for {path.name} lacks {missing}")
    atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


# Tables.


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def text_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or _columns(rows)
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    return "\n".join([line(columns), "  ".join("-" * w for w in widths), *(line(row) for row in cells)])


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)
