"""One thin module per DVC stage (`python -m stages.<name>`): params → library → outputs."""

import sys

from pipeline import tracking

if sys.argv[:1] == ["-m"]:  # a stage is being started with `python -m stages.<name>` (argv[0] is "-m" until found)
    tracking.prestart_helper()
