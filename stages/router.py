"""Stage `router`: the K MSD students behind one velocity model, `models/msd@ensemble` (docs/methods.md §5).

Each label goes to the student that serves it, so the ensemble still costs one network call per sample;
`slimstep sample msd@ensemble` and `eval` load it like any other one-step model.
"""

from pathlib import Path

from pipeline.app.stage import stage
from pipeline.modelio import load_model
from pipeline.msd import Router, check_partition, save_router

STUDENTS, OUT = Path("models/msd"), Path("models/msd@ensemble")


def main() -> None:
    with stage("router", ["msd"]) as s:
        students = [load_model(STUDENTS / str(k)) for k in s.params.msd.students]
        first = students[0].meta
        groups = [student.meta["classes"] for student in students]
        check_partition(groups, first["num_classes"])
        if any(student.meta["net"] != first["net"] for student in students):
            raise ValueError(f"{STUDENTS}: the students' nets differ; a router rebuilds them all from one spec")
        router = Router.from_students([student.net for student in students], groups, first["num_classes"])
        save_router(router, OUT, {
            "stage": "msd@ensemble", "net": first["net"], "data_shape": first["data_shape"],
            "partition": first["partition"], "objective": first["objective"],
        })  # fmt: skip
