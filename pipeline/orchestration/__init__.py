"""The app layer over DVC, Prefect and MLflow (reads params.yaml; the library below it never does).

- `dag`      the stage graph, as `dvc dag --dot` prints it (never a second hand-written DAG)
- `devices`  device slots: a Prefect global concurrency limit per host + a host-wide device pool
- `process`  one stage = `dvc --wait-for-lock repro --single-item <stage>` in its own process group
- `flow`     the Prefect flow (`slimstep run`) and its served deployment (`slimstep serve`)

Import the submodule you need: `flow` pulls in Prefect (~1 s). MLflow records live in pipeline.tracking.
"""
