"""`python -m stages NAME [ARG]`: the one way a stage starts (dvc.yaml's commands).

The MLflow helper process is started first, before the stage imports torch, so its ~1.5 s of imports
overlap the stage's own start-up; then `stages/NAME.py`'s `main(ARG)` runs.
"""

import importlib
import importlib.util
import sys

from pipeline import tracking


def launch(argv: list[str]) -> None:
    if not argv or argv[0].startswith("_") or importlib.util.find_spec(f"stages.{argv[0]}") is None:
        raise SystemExit(f"usage: python -m stages NAME [ARG], NAME a module in stages/ (got {argv[:1]})")
    tracking.prestart_helper()
    importlib.import_module(f"stages.{argv[0]}").main(*argv[1:])


if __name__ == "__main__":
    launch(sys.argv[1:])
