"""A teacher built by the user's own code: `file.py:function` returning an nn.Module, plus its prediction.

The escape hatch for EDM pickles, the official Rectified Flow checkpoints and anything else. The function
is called as `function(folder)` with the imported folder (it loads its weights from there, with whatever
code it needs) and as `function(None)` when slimstep rebuilds the saved teacher (the same architecture;
slimstep then loads the weights it saved). The module is called as `net(x, time, label)` in the model's
own units: velocity `net(x_t, t, label)` (noise at t = 0), epsilon / v / x0 `net(x_tau, tau, label)` with
tau a fractional timestep of its alpha-bar table, edm `net(x_sigma, sigma, label) -> D`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.teachers.conversion import DirectVelocity, EDMVelocity, VPVelocity
from pipeline.teachers.diffusers_source import TeacherFolderError, alphas_cumprod

CODE_DIR = "code"  # inside the saved teacher: the user's .py files, so the folder rebuilds on its own


@contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """The user's folder on sys.path while its code imports its own helpers."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def load_function(folder: Path, entry: str) -> Callable[[Path | None], nn.Module]:
    """`file.py:function` inside `folder` -> the function; one-line errors for a missing file or name."""
    file, _, name = entry.partition(":")
    path = folder / file
    if not path.is_file():
        raise TeacherFolderError(f"{path}: no such file (teacher.source.entry = {entry!r}, expected FILE.py:FUNCTION)")
    module_name = "slimstep_teacher_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _importable(folder):
        spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise TeacherFolderError(f"{path}: no function {name!r} (teacher.source.entry = {entry!r})")

    def call(argument: Path | None) -> nn.Module:
        with _importable(folder):
            net = function(argument)
        if not isinstance(net, nn.Module):
            raise TeacherFolderError(f"{path}: {name}() returned {type(net).__name__}, expected a torch nn.Module")
        return net

    return call


def wrap(net: nn.Module, source: dict[str, Any]) -> nn.Module:
    """The velocity wrapper a python source's declared prediction asks for."""
    prediction = source["prediction"]
    if prediction == "velocity":
        return DirectVelocity(net)
    if prediction == "edm":
        return EDMVelocity(net, source["sigma_min"], source["sigma_max"])
    if prediction in ("epsilon", "v", "x0"):
        schedule = {"_class_name": "DDPMScheduler", **source["schedule"]}
        return VPVelocity(net, alphas_cumprod(schedule, "teacher.source.schedule"), prediction)
    raise TeacherFolderError(f"teacher.source.prediction {prediction!r} is not one of velocity, epsilon, v, x0, edm")


def copy_code(folder: Path, target: Path) -> None:
    """Every .py file under the source folder, at the same relative path under target/code."""
    for file in sorted(folder.rglob("*.py")):
        destination = target / CODE_DIR / file.relative_to(folder)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, destination)
