"""Teachers trained elsewhere (docs/methods.md §8): a diffusers folder or the user's own code, wrapped as
slimstep's velocity v(x, t, label) and saved as a self-contained model folder that `modelio.load_model`
rebuilds (weights + the config it needs + for python sources a copy of the user's code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.modelio import FOLDER_BUILDERS, save_model
from pipeline.teachers import diffusers_source, python_source
from pipeline.teachers.conversion import describe
from pipeline.teachers.diffusers_source import TeacherFolderError

BUILDER = "imported"

__all__ = ["ImportedTeacher", "TeacherFolderError", "import_teacher", "save_teacher"]


@dataclass
class ImportedTeacher:
    net: nn.Module  # v(x, t, label) in slimstep's convention
    meta: dict[str, Any]  # source, prediction, conversion, t_range, num_classes and what rebuilds the net
    code: Path | None = None  # a python source's folder, whose .py files travel with the saved teacher


def _check_output(net: nn.Module, data_shape: tuple[int, ...], num_classes: int, where: str) -> None:
    """One forward on the data's shape: a teacher that returns another shape or non-finite values is refused."""
    x = torch.zeros(2, *data_shape)
    try:
        with torch.no_grad():
            v = net(x, torch.full((2,), 0.5), torch.full((2,), num_classes - 1, dtype=torch.long))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherFolderError(f"{where}: fails on data of shape {data_shape} ({first})") from None
    if tuple(v.shape) != tuple(x.shape):
        raise TeacherFolderError(f"{where}: returns shape {tuple(v.shape)[1:]} for data of shape {data_shape}")
    if not bool(torch.isfinite(v).all()):
        raise TeacherFolderError(f"{where}: returns non-finite values at t = 0.5")


def _diffusers(source: dict[str, Any], data_shape: tuple[int, ...], data_classes: int) -> ImportedTeacher:
    folder = Path(source["path"])
    found = diffusers_source.read_folder(folder, None if source["prediction"] == "auto" else source["prediction"])
    problem = diffusers_source.data_mismatch(found.unet_config, data_shape, data_classes)
    if problem:
        raise TeacherFolderError(f"{found.weights.parent / 'config.json'}: {problem}")
    net, _ = diffusers_source.load_folder(folder, found.prediction)
    classes = found.unet_config.get("num_class_embeds") or 1
    meta = {
        "source": {"kind": "diffusers", "path": str(folder), "scheduler": found.scheduler_class,
                   "weights": found.weights.name},
        "prediction": found.prediction, "unet_config": found.unet_config,
        "scheduler_config": found.scheduler_config, "num_classes": classes,
    }  # fmt: skip
    return ImportedTeacher(net, meta)


def _python(source: dict[str, Any], data_shape: tuple[int, ...], data_classes: int) -> ImportedTeacher:
    folder = Path(source["path"])
    if not source["conditional"] and data_classes > 1:
        raise TeacherFolderError(
            f"teacher.source.conditional is false (one label) but the data have "
            f"{data_classes} classes: import unlabelled data or a conditional teacher"
        )
    build = python_source.load_function(folder, source["entry"])
    net = python_source.wrap(build(folder.resolve()), source)
    meta = {"source": {"kind": "python", **source}, "prediction": source["prediction"],
            "num_classes": data_classes if source["conditional"] else 1}  # fmt: skip
    return ImportedTeacher(net, meta, code=folder)


def import_teacher(source: dict[str, Any], data_shape: tuple[int, ...], data_classes: int) -> ImportedTeacher:
    """Wrap and check the teacher `source` (params teacher.source) for data of this shape and class count."""
    make = {"diffusers": _diffusers, "python": _python}.get(source["kind"])
    if make is None:
        raise TeacherFolderError(f"teacher.source.kind {source['kind']!r} is not an imported teacher")
    teacher = make(source, tuple(data_shape), data_classes)
    teacher.net.eval()
    where = str(Path(source["path"]) / source.get("entry", ""))  # the folder, or the python source's function
    _check_output(teacher.net, tuple(data_shape), teacher.meta["num_classes"], where)
    low, high = teacher.net.t_range
    teacher.meta.update(builder=BUILDER, conversion=describe(teacher.net), t_range=[low, high])
    return teacher


def save_teacher(directory: Path, teacher: ImportedTeacher, meta: dict[str, Any]) -> None:
    """The model folder downstream stages load (weights, meta, a python source's code)."""
    save_model(directory, teacher.net, {**teacher.meta, **meta})
    if teacher.code is not None:
        python_source.copy_code(teacher.code, directory)


def _rebuild(meta: dict[str, Any], directory: Path) -> nn.Module:
    """The saved teacher's wrapper with untrained weights (load_model then loads model.pt into it)."""
    source = meta["source"]
    if source["kind"] == "diffusers":
        return diffusers_source.build_wrapper(meta["unet_config"], meta["scheduler_config"], meta["prediction"])
    build = python_source.load_function(directory / python_source.CODE_DIR, source["entry"])
    return python_source.wrap(build(None), source)


FOLDER_BUILDERS[BUILDER] = _rebuild
