"""Test-only fault injection, loaded by every Python process the tests start (conftest puts this folder first
on PYTHONPATH); production code has no fault hooks.

`SLIMSTEP_FAIL_ONCE=<stage>:<marker file>` makes that stage's first training run stop halfway, write the
marker and fail, once (while the marker exists it never fails again): the retry / resume checks use it.
"""

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

SPEC = os.environ.get("SLIMSTEP_FAIL_ONCE", "")
TARGET = "pipeline.app.stage"


def _break(module) -> None:  # noqa: ANN001 - the freshly imported pipeline.app.stage
    name, marker = SPEC.split(":", 1)
    marker, original = Path(marker), module.Stage.train

    def train(self, net, loss, batches, settings, section, inputs):  # noqa: ANN001, ANN202
        if self.name != name or marker.exists():
            return original(self, net, loss, batches, settings, section, inputs)
        module.train(net, loss, batches, settings, checkpoint=self.checkpoint(section, inputs),
                     tracker=self.tracker, desc=self.name, stop_after=settings.steps // 2)  # fmt: skip
        marker.write_text(f"stopped at step {settings.steps // 2}")
        raise RuntimeError(f"injected failure of stage {name} (SLIMSTEP_FAIL_ONCE)")

    module.Stage.train = train


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            execute(module)
            _break(module)

        loader.exec_module = exec_module
        return spec


if ":" in SPEC:
    sys.meta_path.insert(0, _PatchOnImport())
