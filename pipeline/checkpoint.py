"""Resume checkpoints in scratch/: a cache, so a damaged one is set aside and the stage starts over.

Each checkpoint has a `<name>.sha256` beside it, written after it. A checkpoint whose bytes do not match
(flipped bytes, a kill between the two writes, an older slimstep), that torch cannot read, or whose
layout is not this code's is renamed to `<name>.bad` with one warning line; it never fails the stage.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.errors import IntegrityError
from pipeline.integrity import first_non_finite, load_tensors, sha256_bytes, torch_bytes

CHECKPOINT_FORMAT = 1
KEYS = {"format_version", "step", "net", "ema", "optimizer", "rng", "batches", "loss", "losses"}


def _hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    data = torch_bytes(state)
    atomic_write_bytes(path, data)
    atomic_write_text(_hash_file(path), sha256_bytes(data) + "\n")


def set_aside(path: Path, reason: str) -> Path:
    """Rename an unusable checkpoint out of the way (kept for a look, never loaded again); one warning line."""
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    _hash_file(path).unlink(missing_ok=True)
    print(f"warning: checkpoint {path} {reason}; set aside as {bad.name}, the stage starts over", file=sys.stderr)
    return bad


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None) for a usable checkpoint, else (None, why not)."""
    sidecar = _hash_file(path)
    if not sidecar.is_file():
        return None, "has no recorded sha256 (written by another slimstep, or killed mid-write)"
    try:
        state = load_tensors(path, sidecar.read_text().strip(), "")
    except IntegrityError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    if not isinstance(state, dict) or not set(state) >= KEYS:
        return None, "does not hold a training state"
    if state["format_version"] != CHECKPOINT_FORMAT:
        return None, f"has layout {state['format_version']}, this code writes {CHECKPOINT_FORMAT}"
    for part in ("net", "ema"):
        if (bad := first_non_finite(state[part])) is not None:
            return None, f"holds a non-finite weight ({part}.{bad})"
    return state, None


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved training state, or None (no checkpoint, or one set aside as unusable)."""
    if not path.exists():
        return None
    state, reason = _read(path)
    if reason is not None:
        set_aside(path, reason)
    return state
