"""The MLflow helper process behind `tracking.BackgroundTracker`: reads JSON lines on stdin, logs them in order.

First line: {"op": "start", "stage", "params", "tags", "start_time"}; then "metrics", "params", "tags", "artifact"; last
{"op": "end", "status"}. End of input without "end" means the stage died: the run is marked FAILED.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import tracking
from pipeline.errors import first_line


def warm_up() -> None:
    """Import MLflow and its SQL store before the first message: that is the helper's whole start-up cost."""
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def main() -> None:
    warm_up()
    lines = (json.loads(line) for line in sys.stdin if line.strip())
    start = next(lines, None)
    if start is None or start["op"] != "start":
        return
    try:
        tracker = tracking.open_stage_run(start["stage"], start["params"], start["tags"], start.get("start_time"))
    except Exception as exc:  # a store that broke after the probe: the stage goes on without records
        print(f"warning: MLflow run of {start['stage']} not created ({first_line(exc)}); outputs are kept",
              file=sys.stderr)  # fmt: skip
        for _ in lines:  # drain, so the stage never blocks on a full pipe
            pass
        return
    status = "FAILED"
    for message in lines:
        op = message["op"]
        if op == "end":
            status = message["status"]
            break
        if op == "metrics":
            tracker.log_metrics(message["metrics"], message["step"])
        elif op == "params":
            tracker.log_params(message["params"])
        elif op == "tags":
            tracker.set_tags(message["tags"])
        elif op == "artifact":
            tracker.log_artifact(Path(message["path"]), message["folder"])
    tracking.finish_run(tracker.run_id, status)


if __name__ == "__main__":
    main()
