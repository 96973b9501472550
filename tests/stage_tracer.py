"""Run one stage (`python tests/stage_tracer.py OUT.json NAME [ARG]`, in a project checkout) and record what it
really uses.

Written to OUT.json: the project source files the stage process imported (docstring-only package markers
aside), and every params.yaml key the
stage body read through an access-recording view of the validated params. tests/test_dvc_deps.py compares
both with the stage's entry in dvc.yaml. Reads made while the stage context starts up (device choice, the
MLflow run's logged sections) are not recorded: they never change what the stage computes.
"""

from __future__ import annotations

import ast
import contextlib
import json
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path.cwd().resolve()
PROJECT_DIRS = ("pipeline", "stages")


class ParamsRecorder:
    """Knows the dotted path of every model inside the validated params and records leaf reads under them."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.reads: set[str] = set()
        self.on = False

    def index(self, model: BaseModel, path: str = "") -> None:
        self.paths[id(model)] = path
        for name in type(model).model_fields:
            self._index_value(object.__getattribute__(model, name), f"{path}.{name}" if path else name)

    def _index_value(self, value: Any, path: str) -> None:
        if isinstance(value, BaseModel):
            self.index(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                self._index_value(item, f"{path}.{key}")

    def field_read(self, model: BaseModel, name: str, value: Any) -> None:
        path = self.paths.get(id(model))
        if not self.on or path is None or name not in type(model).model_fields:
            return
        holds_models = isinstance(value, BaseModel) or (
            isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values())
        )
        if not holds_models:  # a value the stage uses, not a container it reads further into
            self.reads.add(f"{path}.{name}" if path else name)

    def whole_read(self, model: BaseModel, exclude: Any = None, include: Any = None) -> None:
        """model_dump / model_copy / == read every leaf under the model (only `include`, less `exclude`)."""
        path = self.paths.get(id(model))
        if not self.on or path is None:
            return
        skipped, kept = set(exclude or ()), set(include or type(model).model_fields)
        for name in type(model).model_fields:
            if name in kept and name not in skipped:
                self._read_tree(object.__getattribute__(model, name), f"{path}.{name}" if path else name)

    def _read_tree(self, value: Any, path: str) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                self._read_tree(object.__getattribute__(value, name), f"{path}.{name}")
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            for key, item in value.items():
                self._read_tree(item, f"{path}.{key}")
        else:
            self.reads.add(path)


def instrument(recorder: ParamsRecorder, classes: list[type[BaseModel]]) -> None:
    for cls in classes:
        original_dump, original_copy, original_eq = cls.model_dump, cls.model_copy, cls.__eq__

        def getattribute(self: BaseModel, name: str) -> Any:
            value = object.__getattribute__(self, name)
            if not name.startswith("_"):
                recorder.field_read(self, name, value)
            return value

        def model_dump(self: BaseModel, *args: Any, _orig: Any = original_dump, **kwargs: Any) -> Any:
            recorder.whole_read(self, kwargs.get("exclude"), kwargs.get("include"))
            return _orig(self, *args, **kwargs)

        def model_copy(self: BaseModel, *args: Any, _orig: Any = original_copy, **kwargs: Any) -> Any:
            recorder.whole_read(self)
            return _orig(self, *args, **kwargs)

        def equals(self: BaseModel, other: Any, _orig: Any = original_eq) -> Any:
            recorder.whole_read(self)
            if isinstance(other, BaseModel):
                recorder.whole_read(other)
            return _orig(self, other)

        cls.__getattribute__ = getattribute  # type: ignore[method-assign]
        cls.model_dump, cls.model_copy, cls.__eq__ = model_dump, model_copy, equals  # type: ignore[method-assign]


def holds_code(path: Path) -> bool:
    """A package marker holding only a docstring cannot change what a stage computes: it needs no dep."""
    body = ast.parse(path.read_text()).body
    return not all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def project_modules() -> list[str]:
    files = {"stages/__main__.py"}  # the launcher runpy ran as __main__ (sys.modules no longer lists it)
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PROJECT_DIRS and holds_code(path):
            files.add(path.relative_to(ROOT).as_posix())
    return sorted(files)


def main(out: str, *stage_argv: str) -> None:
    sys.path.insert(0, str(ROOT))  # the checkout's own code, not an installed copy
    import pipeline.config as config
    from pipeline.nets import NetSpec

    recorder = ParamsRecorder()
    instrument(recorder, [config.Section, NetSpec])
    validate = config.validate_params

    def recorded_validate(raw: dict[str, Any], source: str = "params.yaml") -> config.Params:
        params = validate(raw, source)
        recorder.index(params)
        return params

    config.validate_params = recorded_validate  # load_params looks the name up at call time

    from pipeline.app import stage as app_stage

    opened = app_stage.stage

    @contextlib.contextmanager
    def recorded_stage(*a: Any, **kw: Any) -> Iterator[Any]:
        with opened(*a, **kw) as handle:
            recorder.on = True
            yield handle
            recorder.on = False

    app_stage.stage = recorded_stage
    sys.argv = ["stages", *stage_argv]
    try:
        runpy.run_module("stages", run_name="__main__", alter_sys=True)
    finally:
        Path(out).write_text(json.dumps({"modules": project_modules(), "params": sorted(recorder.reads)}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
