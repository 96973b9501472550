"""The app layer: the only code that reads params.yaml and argv (stages via `stage`, the CLI, orchestration).

`pipeline.app.stage.stage(...)` is the context every stage module runs in; `python -m stages NAME` starts one.
"""
