"""Content hashes of artifacts: a sha256 recorded when a file is written, checked when it is read.

torch's zip reader skips its own CRCs, so flipped bytes in a `.pt` load without complaint; the recorded
hash is what turns damage into one line naming the file and the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import IntegrityError, NonFiniteError, first_line


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_bytes(obj: Any) -> bytes:
    """What `torch.save` writes, in memory (the zip records then do not depend on a temp file name)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _then(rebuild: str) -> str:
    return f"; {rebuild}" if rebuild else ""


def read_verified(path: Path | str, expected: str | None, rebuild: str) -> bytes:
    """The file's bytes; IntegrityError when a recorded hash (`expected`) does not match them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing{_then(rebuild)}")
    data = path.read_bytes()
    if expected is not None and sha256_bytes(data) != expected:
        raise IntegrityError(f"{path}: content does not match the sha256 recorded when it was written "
                             f"(damaged or edited){_then(rebuild)}")  # fmt: skip
    return data


def load_tensors(path: Path | str, expected: str | None, rebuild: str) -> Any:
    """`torch.load(weights_only=True)` of a verified file; an unreadable one is an IntegrityError, never a traceback."""
    data = read_verified(path, expected, rebuild)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage, or a pickle that is not plain tensors
        raise IntegrityError(f"{path}: not a readable tensor file ({first_line(exc)}){_then(rebuild)}") from None


def rebuild_hint(stage: str, path: Path | str) -> str:
    return f"restore it with `dvc checkout {path}` or rebuild it with `dvc repro {stage}`"


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding a NaN or an infinity, else None."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to save (or use) weights with a NaN or an infinity: they would pass as a trained model."""
    bad = first_non_finite(state)
    if bad is not None:
        raise NonFiniteError(f"{what}: weight {bad!r} is not finite (NaN or inf); nothing was saved. Likely "
                             "causes: non-finite training data or pairs, a too high learning rate")  # fmt: skip
