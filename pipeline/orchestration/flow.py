"""The Prefect flow: DVC's DAG as tasks, one device slot each, one MLflow parent run per flow run.

Scheduling is Prefect's, deciding what is stale is DVC's: a task runs `dvc --wait-for-lock repro
--single-item <stage>` and DVC skips it when it is up to date (one `dvc status` up front settles the
stages nothing changed, without starting DVC once per stage). The flow submits a stage as soon as its
upstream stages succeeded (so a worker thread never sits waiting on a dependency); the task then waits
for a device slot on the host's global concurrency limit and takes a device from the host-wide pool.
A failed stage is retried (it resumes from its scratch checkpoint); if it still fails, its downstream
stages are skipped, independent ones finish, and the failure carries the stage's log tail. Cancelling
the flow run (SIGTERM from a runner or worker, Ctrl-C) kills every stage's process group, and nothing
starts or retries after that.
"""


import contextlib
import itertools
import json
import logging
import os
import queue
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import tracking
from pipeline.orchestration import experiments, process
from pipeline.orchestration.dag import StageGraph, read_graph
from pipeline.orchestration.devices import DevicePool, Slots, ensure_limit, limit_name, plan_slots
from pipeline.orchestration.flowlock import FlowRunning, one_flow

FLOW_NAME = "slimstep"
# The deployment form's choices. tests/test_watch.py checks them against configs/ and dvc.yaml.
ProfileChoice = Literal["current", "smoke", "digits", "toy2d", "mnist", "mnist-unet", "cifar10"]
# `pairs@…` and `msd@…` depend on the profile's params: their groups (`pairs`, `msd`) stand for them.
StageName = Literal["data", "featurizer", "teacher", "stepper", "pairs", "anneal", "anneal@slimflow", "anneal@reflow",
                    "distill", "distill@fgd", "distill@naive", "distill@naive-paper", "msd", "router",
                    "meanflow", "eval"]  # fmt: skip
MAX_WORKERS = 16  # threads only exist for submitted (ready) stages, and each then waits for a device slot
LEASE_S = 60  # a slot held by a killed process frees itself this long after its last renewal (Prefect's minimum)
SLOT_POLL_S = 10  # wait for a slot in rounds this long, so a cancelled flow run stops waiting
LOGS = Path("scratch/logs")  # git-ignored, undeclared in dvc.yaml; `slimstep clean` removes it
LEADERBOARD = Path("reports/leaderboard.csv")
BOARD_COLUMNS = ["model", "sampler", "nfe", "params", "fd", "fd_std", "fd_heldout", "class_acc", "samples_per_s"]


class PipelineError(RuntimeError):
    """A flow run that cannot start (bad params, unknown target) or whose stages failed."""


class StageFailed(RuntimeError):
    """One stage's DVC command exited non-zero; the message holds the tail of its log (shown in the UI)."""


@dataclass
class StageContext:
    """What every stage task of one flow run shares."""

    root: Path
    env: dict[str, str]
    slots: Slots
    limit: str
    pool: DevicePool
    log_dir: Path
    pull: bool = False
    push: bool = False


class _QuietSlotTimeouts(logging.Filter):
    """Prefect logs every timed-out slot request as an ERROR; here a timeout is just one round of waiting."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("ConcurrencySlotAcquisition" in message and "TimeoutError" in message)


logging.getLogger("prefect._internal.concurrency").addFilter(_QuietSlotTimeouts())


@contextlib.contextmanager
def device_slot(limit: str) -> Iterator[None]:
    """One slot of the host's global limit (strict: a missing limit is an error, never a silent no-op)."""
    with contextlib.ExitStack() as held:
        for round_ in itertools.count():
            if process.cancelled():
                raise process.StageCancelled("flow run cancelled while waiting for a device slot")
            try:
                held.enter_context(
                    concurrency(limit, occupy=1, strict=True, timeout_seconds=SLOT_POLL_S, lease_duration=LEASE_S)
                )  # fmt: skip
                break
            except TimeoutError:
                if round_ == 0:
                    get_run_logger().info("waiting for a free slot of %s", limit)
        yield


def _retry_unless_cancelled(*_: Any) -> bool:
    return not process.cancelled()


@task(
    name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1,
    retry_condition_fn=_retry_unless_cancelled,
)  # fmt: skip
def stage_task(stage: str, ctx: StageContext, fresh: bool = False) -> process.StageRun:
    """Hold one device slot while DVC brings `stage` up to date (runs, restores from run-cache, or skips).

    `fresh`: `dvc status` found the stage and everything upstream unchanged, so `repro` would only say so.
    """
    logger = get_run_logger()
    if fresh:
        logger.info("%s: up to date (dvc status)", stage)
        now = time.time()
        return process.StageRun(stage, 0, "up to date", 0.0, now, now, ctx.log_dir / "status")
    with device_slot(ctx.limit), ctx.pool.take(stop=process.cancelled) as device:
        logger.info("%s: %s", stage, device)
        env = {**ctx.env, **ctx.slots.env(device)}
        attempt = task_run.get_run_count()
        log = ctx.log_dir / f"{stage.replace('@', '-')}{f'.{attempt}' if attempt > 1 else ''}.log"
        run = process.run_stage(
            stage, ctx.root, env, log, process.repro_command(stage, ctx.pull), on_line=lambda line: logger.info(line),
            pass_fds=(ctx.pool.fd(device),),
        )  # fmt: skip
        if run.returncode == 0 and ctx.push:
            pushed = process.run_stage(stage, ctx.root, env, log.with_suffix(".push.log"),
                                       process.dvc("push", "--run-cache", stage))  # fmt: skip
            if pushed.returncode:
                raise StageFailed(f"`dvc push --run-cache {stage}` failed:\n{pushed.tail_text()}")
    if run.returncode:
        raise StageFailed(
            f"stage {stage} failed (exit {run.returncode}); last lines of {log}:\n{run.tail_text()}"
        )  # fmt: skip
    logger.info("%s: %s in %.1f s", stage, run.outcome, run.seconds)
    return run


@dataclass
class Schedule:
    done: dict[str, process.StageRun]
    failed: dict[str, str]  # stage -> error message
    skipped: list[str]  # downstream of a failure: not run


def run_graph(graph: StageGraph, ctx: StageContext, retries: int, in_flight: int | None = None) -> Schedule:
    """Submit ready stages (upstream succeeded), at most `in_flight` at once (default: the slots); repeat.

    One `dvc status` up front: a stage it reports unchanged, whose upstream stages were all up to date
    too, is settled without launching `dvc repro` (about 2 s of DVC start-up per stage).

    Capping submissions at the slot count keeps idle tasks out of the UI and spares the Prefect server
    concurrent slot requests (an SQLite-backed server answers those with 503 + a ~2 s client retry).
    The global limit still guards the devices against other flow runs on this host.
    """
    task_ = stage_task.with_options(retries=retries)
    cap = in_flight or ctx.slots.size
    finished: queue.Queue[str] = queue.Queue()
    futures: dict[str, Any] = {}
    done: dict[str, process.StageRun] = {}
    failed: dict[str, str] = {}
    skipped: list[str] = []
    stale = None if ctx.push else process.stale_stages(ctx.root)  # pushing: every stage must run its task
    todo, running = graph.order(), set()
    while todo or running:
        for stage in list(todo):
            ups = graph.upstream[stage]
            if ups & (set(failed) | set(skipped)):
                todo.remove(stage)
                skipped.append(stage)
            elif ups <= set(done) and len(running) < cap:
                todo.remove(stage)
                running.add(stage)
                fresh = stale is not None and stage not in stale and all(done[u].outcome == "up to date" for u in ups)
                futures[stage] = task_.submit(stage, ctx, fresh, wait_for=[futures[u] for u in ups])
                futures[stage].add_done_callback(lambda _, s=stage: finished.put(s))
        if not running:
            break
        with contextlib.suppress(queue.Empty):  # a timeout keeps the main thread responsive to signals
            stage = finished.get(timeout=1.0)
            running.discard(stage)
            try:
                done[stage] = futures[stage].result()
            except Exception as exc:  # the task's own failure, retries exhausted
                failed[stage] = str(exc)
    return Schedule(done, failed, skipped)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set env vars for the flow's own MLflow calls, restoring them after (tests run flows in-process)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _switch_profile(root: Path, name: str, force: bool = False) -> None:
    import subprocess

    switched = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "profile", name, *(["--force"] if force else [])], cwd=root,
        capture_output=True, text=True,
    )  # fmt: skip
    if switched.returncode:
        raise PipelineError((switched.stdout + switched.stderr).strip())


def _experiment_workspace(root: Path, profile: str | None, overrides: dict[str, Any]) -> Path:
    """The run's own worktree: the checkout's params.yaml (or `profile`) plus `overrides`, validated first."""
    import yaml

    current = yaml.safe_load((root / "params.yaml").read_text()) if (root / "params.yaml").exists() else {}
    try:
        if profile is None:
            experiments.validated(current, overrides)  # a bad override fails before a worktree exists
        name = experiments.workspace_name(flow_run.get_name() or time.strftime("exp-%Y%m%d-%H%M%S"))
        path = experiments.create_workspace(root, name, current)
    except experiments.OverrideError as exc:
        raise PipelineError(str(exc)) from None
    try:
        if profile:
            _switch_profile(path, profile, force=True)
        params = experiments.validated(yaml.safe_load((path / "params.yaml").read_text()), overrides)
    except (experiments.OverrideError, PipelineError) as exc:
        experiments.remove_workspace(root, path)
        raise PipelineError(str(exc)) from None
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def validated_params(root: Path) -> Any:
    """The whole params file checked before any stage starts: one readable message, no traceback."""
    from pipeline.config import ParamsError, load_params

    try:
        return load_params(root / "params.yaml")
    except ParamsError as exc:
        raise PipelineError(str(exc)) from None


def _kill_stages(*_: Any) -> None:
    process.cancel_all()


def mlflow_link(run_id: str | None) -> str:
    """A clickable link for a tracking server; for the embedded SQLite store, the command that serves it."""
    if not run_id:
        return "MLflow tracking is off (SLIMSTEP_TRACKING=off)"
    uri = tracking.tracking_uri()
    experiment = tracking.ensure_store()
    # MLflow 3's UI opens on its GenAI overview unless told: the query parameter picks the model-training view.
    path = f"#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"[MLflow run {run_id}]({uri.rstrip('/')}/{path})"
    return (
        f"MLflow run `{run_id}` in `{uri}`: start `mlflow server --backend-store-uri {uri} --host 127.0.0.1 "
        f"--port 5000`, then open http://127.0.0.1:5000/{path}"
    )


def _markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(root: Path, profile: str, schedule: Schedule, link: str, registered: list[str]) -> str:
    stages = [{"stage": s, "outcome": r.outcome, "seconds": round(r.seconds, 1)} for s, r in schedule.done.items()]
    stages += [{"stage": s, "outcome": "FAILED", "seconds": ""} for s in schedule.failed]
    stages += [{"stage": s, "outcome": "not run (upstream failed)", "seconds": ""} for s in schedule.skipped]
    parts = [f"# slimstep pipeline run · profile `{profile}`", "", link, "", "## Stages", "",
             _markdown_table(stages, ["stage", "outcome", "seconds"])]  # fmt: skip
    board = root / LEADERBOARD
    if board.exists():
        import pandas as pd

        frame = pd.read_csv(board)
        columns = [c for c in BOARD_COLUMNS if c in frame.columns]
        parts += ["", f"## Leaderboard (`{LEADERBOARD}`)", "", _markdown_table(frame.to_dict("records"), columns)]
    if registered:
        parts += ["", "## Registered models", "", *[f"- {line}" for line in registered]]
    return "\n".join(parts)


@flow(
    name=FLOW_NAME,
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS),
    on_cancellation=[_kill_stages],
    on_crashed=[_kill_stages],
)
def slimstep_flow(
    profile: ProfileChoice = "current",
    targets: list[StageName] | None = None,
    overrides: dict[str, Any] | None = None,
    gpus: int = -1,
    slots: int = 0,
    threads: int = 0,
    retries: int = 1,
    pull: bool = False,
    push: bool = False,
    register_models: bool = True,
    root: str = "",
) -> dict[str, Any]:
    """Bring the DVC pipeline (or `targets` and their upstream) up to date, stages in parallel where the DAG allows.

    Args:
        profile: Parameter set to start from: `current` keeps params.yaml as it is; a profile name switches
            to that configs/ file first (in the experiment's own workspace when there are overrides).
        targets: Stages to bring up to date, with everything upstream of them; empty = the whole DAG.
            A group name (`distill`) means all its stages (`distill@fgd`, `distill@naive`).
        overrides: Parameters to change for this run only, as dotted keys of params.yaml, e.g.
            {"teacher.lr": 0.002, "distill.steps": 400}. Checked against the schema before anything runs;
            the run then happens in its own git worktree (scratch/experiments/RUN-NAME) sharing the DVC
            cache, so the checkout's params.yaml is never touched, and is saved as a DVC experiment.
        gpus: Use the first N GPUs; 0 = CPU only; -1 = every GPU found.
        slots: Stages running at once; 0 = one per GPU, or CPU cores ÷ threads per stage.
        threads: CPU threads per stage; 0 = the cores shared out among the slots.
        retries: Retries of a failed stage (it resumes from its scratch checkpoint).
        pull: `dvc repro --pull`: fetch missing inputs and outputs from the default DVC remote.
        push: `dvc push --run-cache` after each stage, so other machines can skip it.
        register_models: Register the one-step student and the MSD router in the MLflow model registry.
        root: The repository to run in; empty = the working directory of the process running the flow.
    """
    base = Path(root or Path.cwd()).resolve()
    logger = get_run_logger()
    chosen_profile = None if profile == "current" else profile
    workspace = None
    if overrides:  # checked against the schema before anything is made
        workspace = _experiment_workspace(base, chosen_profile, overrides)
        logger.info("experiment workspace %s with overrides %s", workspace, overrides)
        base = workspace
    try:
        with one_flow(base, "slimstep run") as flow_env:  # an experiment's own worktree is its own checkout
            if chosen_profile and not workspace:
                _switch_profile(base, chosen_profile)
            return _run_flow(
                base, flow_env, workspace, targets, overrides, (gpus if gpus >= 0 else None), (slots or None),
                (threads or None), retries, pull, push, register_models,
            )  # fmt: skip
    except FlowRunning as exc:
        raise PipelineError(str(exc)) from None


def _run_flow(
    base: Path, flow_env: dict[str, str], workspace: Path | None, targets: list[str] | None,
    overrides: dict[str, Any] | None, gpus_: int | None, slots_: int | None, threads_: int | None, retries: int,
    pull: bool, push: bool, register_models: bool,
) -> dict[str, Any]:  # fmt: skip
    logger = get_run_logger()
    params = validated_params(base)
    graph = read_graph(base).restrict(targets)
    plan = plan_slots(gpus=gpus_, slots=slots_, threads=threads_, width=graph.width())
    limit, pool = limit_name(), DevicePool(plan.devices)
    if released := ensure_limit(limit, plan.size, held=pool.held()):
        logger.warning("released %d slot(s) of %s left by a run that died holding them", released, limit)
    logger.info("%d stage(s) %s; %s; limit %s", len(graph.stages), graph.order(), plan.describe(), limit)

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tracking.repo_root(base) / 'mlflow.db'}"
    with _environ(MLFLOW_TRACKING_URI=uri):
        parent = None
        if tracking.enabled():
            tracking.ensure_store()  # once, before stages fan out (concurrent creation half-migrates SQLite)
            parent = tracking.start_pipeline_run(f"{params.profile} · {flow_run.get_name() or 'flow'}", {
                "slimstep.profile": params.profile, "slimstep.orchestrator": "prefect",
                "slimstep.targets": ",".join(targets or []) or "all",
                "prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": flow_run.get_name() or "",
                "prefect.flow_run_url": flow_run.get_flow_run_ui_url() or "",
                **({"slimstep.overrides": json.dumps(overrides, sort_keys=True), "slimstep.workspace": str(base)}
                   if workspace else {}),
            })  # fmt: skip
        # Stages' `python` is this interpreter, whether or not its environment is activated.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", **flow_env}
        env.update(tracking.child_env())
        if parent:
            env[tracking.PARENT_ENV] = parent
        logs = base / LOGS / (flow_run.get_name() or "run")
        ctx = StageContext(base, env, plan, limit, pool, logs, pull, push)
        process.reset()
        try:
            schedule = run_graph(graph, ctx, retries)
        except BaseException:  # cancelled (SIGTERM), interrupted or crashed: no stage outlives its flow run
            process.cancel_all()
            tracking.end_pipeline_run(parent, False)
            raise
        ok = not schedule.failed
        try:
            registered = _record(parent, base, params.profile, register_models) if ok else []
            if ok and workspace and (saved := experiments.save_experiment(workspace, workspace.name)):
                logger.info("saved as DVC experiment %s (`dvc exp show` lists it)", saved)
                if parent:
                    tracking.MlflowTracker(parent).set_tags({"slimstep.dvc_experiment": saved})
            link = mlflow_link(parent)
            create_markdown_artifact(
                summary_markdown(base, params.profile, schedule, link, registered),
                key=f"slimstep-{params.profile}".lower().replace("_", "-"),
                description=f"slimstep pipeline run, profile {params.profile}",
            )  # fmt: skip
        finally:
            tracking.end_pipeline_run(parent, ok)
    if schedule.failed:
        details = "\n\n".join(f"{stage}: {message}" for stage, message in schedule.failed.items())
        raise PipelineError(
            f"{len(schedule.failed)} stage(s) failed ({', '.join(schedule.failed)}); not run: "
            f"{', '.join(schedule.skipped) or 'none'}\n\n{details}"
        )
    return {
        "mlflow_run_id": parent,
        "stages": {stage: schedule.done[stage].outcome for stage in graph.order()},
        "slots": plan.size,
        "limit": limit,
    }


def _record(parent: str | None, root: Path, profile: str, register: bool) -> list[str]:
    """Mirror the finished workspace (params, leaderboard metrics, featurizer hash) onto the parent run."""
    if not parent:
        return []
    from pipeline.tracking import records, registry

    records.record_pipeline_run(parent, root)
    if not register:
        return []
    try:
        return [r.describe() for r in registry.register_models(parent, root, profile)]
    except Exception as exc:  # registering is a convenience on top of a finished pipeline
        get_run_logger().warning("model registration failed: %s", exc)
        return [f"registration failed: {exc}"]


def serve(cron: str | None = None, name: str = "slimstep-local", **parameters: Any) -> None:
    """Serve the flow as a deployment (this process runs its flow runs); optional cron schedule."""
    started = time.strftime("%Y-%m-%d %H:%M")
    defaults = {"root": str(Path.cwd()), **{k: v for k, v in parameters.items() if v is not None}}
    slimstep_flow.serve(
        name=name, cron=cron, parameters=defaults,
        description=f"slimstep over dvc.yaml in {Path.cwd()} (served since {started})",
    )  # fmt: skip
