"""`slimstep`: the commands a user types. The app layer: it reads argv and params.yaml, the library does not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

app = typer.Typer(
    help="Compress a rectified-flow teacher into small one-step generators.", no_args_is_help=True
)
console = Console(soft_wrap=True)  # never break a line inside a path: messages are copied and grepped
PARAMS, LEADERBOARD = Path("params.yaml"), Path("reports/leaderboard.csv")
EXPORT_CACHE = Path("scratch/exports")  # `sample --backend onnx` exports here, keyed by the model's hash


def _write_params(params: dict[str, Any]) -> None:
    """params.yaml after an import's edits, written atomically in the rendered profiles' layout."""
    from pipeline.atomic import atomic_write_text
    from pipeline.profiles import dump

    atomic_write_text(PARAMS, dump(params))


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = _flat(a), _flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _committed_params() -> dict[str, Any] | None:
    shown = subprocess.run(["git", "show", f"HEAD:{PARAMS}"], capture_output=True, text=True)
    return yaml.safe_load(shown.stdout) if shown.returncode == 0 else None


def validate_or_exit() -> Any:
    from pipeline.config import ParamsError, load_params

    try:
        return load_params(PARAMS)
    except ParamsError as exc:
        _fail(str(exc))


@app.command()
def profile(
    name: Annotated[str, typer.Argument(help="a file name in configs/: smoke | digits | toy2d | cifar10 | …")],
    force: Annotated[
        bool, typer.Option("--force", help="overwrite uncommitted edits to params.yaml")
    ] = False,
) -> None:
    """Render a profile (schema defaults + configs/NAME.yaml) into params.yaml, the complete set DVC tracks."""
    from pipeline.atomic import atomic_write_text
    from pipeline.config import ParamsError
    from pipeline.profiles import available, render, render_text

    try:
        text = render_text(name)
    except ParamsError as exc:
        _fail(str(exc))
    if PARAMS.exists() and not force:
        try:
            current = yaml.safe_load(PARAMS.read_text())
        except yaml.YAMLError:
            _fail("params.yaml is not valid YAML; fix it, or pass --force to overwrite it")
        committed = _committed_params()
        if current != committed and current not in [render(other) for other in available()]:
            reference = committed if committed is not None else render(name)
            keys = ", ".join(_differences(current, reference)) or "(formatting only)"
            _fail(f"params.yaml has uncommitted edits ({keys}); commit them or pass --force")
    atomic_write_text(PARAMS, text)
    console.print(f"params.yaml ← defaults + configs/{name}.yaml (run [bold]dvc repro[/bold] or [bold]make run[/bold])")


@app.command()
def validate() -> None:
    """Check params.yaml against the schema; name every bad key, its value and what is allowed."""
    params = validate_or_exit()
    console.print(f"params.yaml is valid (profile {params.profile})")


def print_leaderboard(path: Path = LEADERBOARD) -> None:
    import pandas as pd

    if not path.exists():
        return
    board = pd.read_csv(path)
    table = Table(title=f"Leaderboard ({path})")
    formats = {"model": "{}", "sampler": "{}", "nfe": "{:.4g}", "params": "{:,.0f}", "fd": "{:.2f}", "fd_std": "{:.2f}",
               "fd_heldout": "{:.2f}", "fid": "{:.2f}", "kid": "{:.4f}", "class_acc": "{:.3f}",
               "samples_per_s": "{:,.0f}"}  # fmt: skip
    formats = {c: f for c, f in formats.items() if c in board.columns}
    for column in formats:
        table.add_column(column, justify="left" if column in ("model", "sampler") else "right", no_wrap=True)
    for row in board.to_dict("records"):
        table.add_row(*["" if pd.isna(row[c]) else fmt.format(row[c]) for c, fmt in formats.items()])
    wide(table)
    console.print(f"Sample grids: {Path('reports/grids').resolve()}  ·  plot: reports/quality_nfe.png")


def check_tracking() -> None:
    """SLIMSTEP_TRACKING=required and no usable store: stop before any stage (else a dead store only warns)."""
    from pipeline import tracking

    try:
        tracking.enabled()
    except tracking.TrackingUnavailable as exc:
        _fail(str(exc))


@app.command()
def repro(
    targets: Annotated[
        list[str] | None, typer.Argument(help="stages to bring up to date (default: all)")
    ] = None,
    profile_name: Annotated[str | None, typer.Option("--profile", help="switch profile first")] = None,
    register: Annotated[bool, typer.Option(help="register the one-step student and MSD router")] = True,
) -> None:
    """Validate params, then `dvc repro` under one MLflow parent run; register the models; print the leaderboard."""
    from pipeline import tracking

    if profile_name:
        profile(profile_name, force=False)
    params = validate_or_exit()
    check_tracking()
    from pipeline.orchestration.flowlock import FlowRunning, one_flow

    try:
        with one_flow(Path.cwd(), "slimstep repro") as flow_env:
            name = f"{params.profile} · repro {time.strftime('%Y-%m-%d %H:%M:%S')}"
            parent = tracking.start_pipeline_run(name, {"slimstep.profile": params.profile, "slimstep.source": "repro"})
            env = {**os.environ, **({tracking.PARENT_ENV: parent} if parent else {}), **flow_env}
            env.update(tracking.child_env())
            code = subprocess.run(["dvc", "repro", *(targets or [])], env=env).returncode
            if code == 0 and parent:
                _record_and_register(parent, params.profile, register)
            tracking.end_pipeline_run(parent, code == 0)
    except FlowRunning as exc:
        _fail(str(exc), code=1)
    if code:
        raise typer.Exit(code)
    print_leaderboard()


def _record_and_register(parent: str, profile_name: str, register: bool = True) -> list[Any]:
    """Mirror the workspace onto the parent run and register its models, as `slimstep run` does; never fatal."""
    from pipeline.tracking import records, registry

    try:
        records.record_pipeline_run(parent, Path.cwd())
        done = registry.register_models(parent, Path.cwd(), profile_name) if register else []
    except Exception as exc:  # the pipeline itself finished: recording it is a convenience on top
        console.print(f"[yellow]warning:[/yellow] recording/registering in MLflow failed: {escape(str(exc))}")
        return []
    for item in done:
        console.print(item.describe())
    return done


@app.command()
def sample(
    model: Annotated[str, typer.Argument(help="a stage name (teacher, distill@fgd, …) or a model folder")],
    n: Annotated[int, typer.Option(help="number of samples")] = 64,
    labels: Annotated[str | None, typer.Option(help="comma-separated class ids (default: cycle all)")] = None,
    out: Annotated[Path, typer.Option(help="grid.png or samples.npz")] = Path("samples.png"),
    sampler: Annotated[str | None, typer.Option(help="override the model's own sampler")] = None,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    backend: Annotated[
        str, typer.Option(help="torch, or onnx: one-step models through onnxruntime (exported to scratch/exports)")
    ] = "torch",
) -> None:
    """Sample any trained model with its own sampler settings; write a labelled grid (.png) or arrays (.npz)."""
    import numpy as np
    import torch

    from pipeline.flow import parse_sampler
    from pipeline.flow import sample as run_sampler
    from pipeline.grids import sample_grid
    from pipeline.modelio import load_model

    folder = Path(model) if Path(model).is_dir() else Path("models") / model
    try:
        loaded = load_model(folder)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    meta = loaded.meta
    classes = meta["num_classes"]
    wanted = [int(c) for c in labels.split(",")] if labels else list(range(classes))
    if any(c < 0 or c >= classes for c in wanted):
        _fail(f"--labels must lie in 0..{classes - 1}")
    label = torch.tensor(wanted).repeat(n // len(wanted) + 1)[:n].sort().values
    z = torch.randn((n, *meta["data_shape"]), generator=torch.Generator().manual_seed(seed))
    name = sampler or ("onestep" if meta["kind"] != "flow" else meta.get("default_sampler", "dopri5-1e-05"))
    try:
        parse_sampler(name)
    except ValueError as exc:
        _fail(str(exc))
    if backend not in ("torch", "onnx"):
        _fail(f"--backend {backend!r}: allowed torch, onnx")
    if backend == "onnx":
        if name != "onestep":
            _fail(f"--backend onnx runs one-step models only ({folder} samples with {name})")
        from pipeline.export import OnnxSampler, cached_onnx

        onnx_file = cached_onnx(folder, EXPORT_CACHE, LEADERBOARD)
        x, nfe, via = torch.from_numpy(OnnxSampler(onnx_file)(z.numpy(), label.numpy())), 1, f" via {onnx_file}"
    else:
        result = run_sampler(loaded.net, z, label, name)
        x, nfe, via = result.x, result.nfe, ""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, images=x.numpy(), labels=label.numpy())
    else:
        data_meta = Path("data/meta.json")
        described = json.loads(data_meta.read_text()) if data_meta.exists() else {}
        sample_grid(x, label, classes, out, f"{meta['stage']} ({name}, NFE {nfe})",
                    described.get("conditional", True), described.get("class_names"))  # fmt: skip
    console.print(f"{n} samples from {folder} with {name} (NFE {nfe}){via} → {out}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="a one-step stage (distill@fgd, msd@ensemble, …) or a model folder")],
    out: Annotated[Path, typer.Option(help="the file to write (a <name>.meta.json goes beside it)")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript | safetensors")] = "onnx",
) -> None:
    """Export a one-step model as noise (N,*shape) float32 + label (N,) int64 -> sample in [-1, 1]."""
    from pipeline.export import export_model, meta_path

    folder = Path(model) if Path(model).is_dir() else Path("models") / model
    try:
        info = export_model(folder, fmt, out, LEADERBOARD)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    fd = "no FD in the leaderboard" if info["fd"] is None else f"FD {info['fd']:.4g}"
    console.print(f"{info['stage']} → {out} ({fmt}, model {info['model_hash']}, {fd}); meta: {meta_path(out)}")


@app.command("import-data")
def import_data(
    source: Annotated[
        Path,
        typer.Argument(help="an image folder (one subfolder per class, or flat), a cifar-10-batches-py folder, "
                       "or an .npz with images (and labels)"),
    ],
    size: Annotated[int | None, typer.Option(help="image folders: resize + centre-crop to SIZE x SIZE")] = None,
    channels: Annotated[int | None, typer.Option(help="image folders: 1 (grayscale) or 3 (RGB); default: "
                                                  "1 if every image is grayscale, else 3")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="skip unreadable images (counted) instead of "
                                           "refusing")] = False,
) -> None:
    """Copy a local data set into inputs/ (so DVC hashes it) and point params.yaml's data section at it."""
    if not source.exists():
        _fail(f"{source}: no such file or folder")
    if source.is_dir() and not (source / "data_batch_1").exists():
        _import_image_folder(source, size, channels, skip_bad)
        return
    if size is not None or channels is not None:
        _fail(f"{source}: --size/--channels apply to image folders only")
    target = Path("inputs") / source.name
    target.parent.mkdir(exist_ok=True)
    same = source.resolve() == target.resolve()
    if source.is_dir():
        if not same:
            shutil.copytree(source, target, dirs_exist_ok=True)
        dataset = "cifar10"
    elif source.suffix == ".npz":
        import numpy as np

        from pipeline.data import read_npz_arrays
        from pipeline.datacheck import check_data
        from pipeline.errors import DataError

        try:
            images, labels, _ = read_npz_arrays(source)
            check_data(images, np.zeros(len(images), np.int64) if labels is None else labels, str(source))
        except DataError as exc:
            _fail(f"{exc}; nothing was imported")
        if not same:
            shutil.copyfile(source, target)
        dataset = "npz"
    else:
        _fail(f"{source}: expected an image folder, a folder of CIFAR-10 python batches or an .npz file")
    params = yaml.safe_load(PARAMS.read_text())
    params["data"].update(dataset=dataset, path=str(target))
    _write_params(params)
    console.print(f"imported {source} → {target}; data.dataset = {dataset}, data.path = {target}")


def _import_image_folder(source: Path, size: int | None, channels: int | None, skip_bad: bool) -> None:
    """Image folder → inputs/<name>.npz (uint8); a flat folder is unconditional, so MSD gets one student."""
    from pipeline.imagefolder import ImageFolderError, read_image_folder, write_npz

    if size is None:
        _fail(f"{source}: an image folder needs --size N (images are resized and centre-cropped to N x N)")
    try:
        images = read_image_folder(source, size, channels, skip_bad)
    except ImageFolderError as exc:
        _fail(str(exc))
    target = Path("inputs") / f"{source.resolve().name}.npz"
    write_npz(images, target)
    params = yaml.safe_load(PARAMS.read_text())
    params["data"].update(dataset="npz", path=str(target))
    notes = []
    n = len(images.images)
    if params["data"]["heldout"] > n // 4:
        params["data"]["heldout"] = max(1, n // 5)
        notes.append(f"data.heldout = {params['data']['heldout']} (a fifth of the images)")
    if not images.conditional and len(params["msd"]["students"]) > 1:
        params["msd"]["students"] = [0]
        notes.append("msd.students = [0] (MSD partitions classes; a flat folder has none)")
    _write_params(params)
    kind = f"{len(images.class_names)} classes ({', '.join(images.class_names)})" if images.conditional else \
        "unconditional (flat folder)"
    shape = "x".join(map(str, images.images.shape[1:]))
    console.print(f"imported {n} images {shape} from {source}, {kind} → {target}")
    if images.skipped:
        console.print(f"skipped {len(images.skipped)} unreadable file(s), e.g. {images.skipped[0]}")
    console.print(f"data.dataset = npz, data.path = {target}" + "".join(f"; {note}" for note in notes))


TEACHER_INPUTS = Path("inputs/teacher")  # the teacher stage's DVC dependency: one imported teacher at a time


@app.command("import-teacher")
def import_teacher(
    source: Annotated[Path, typer.Argument(help="a diffusers model folder, or with --entry a folder / .py file")],
    prediction: Annotated[
        str | None,
        typer.Option(help="diffusers: epsilon | v_prediction | sample | flow (default: the scheduler's); "
                     "python: velocity | epsilon | v | x0 | edm (required)"),
    ] = None,
    entry: Annotated[
        str | None, typer.Option(help="python source: FILE.py:FUNCTION inside the folder (FILE defaults to the .py)")
    ] = None,
    conditional: Annotated[bool, typer.Option(help="python source: the net takes class labels")] = True,
) -> None:
    """Copy a pretrained teacher into inputs/teacher (so DVC hashes it) and point teacher.source at it."""
    from pipeline.teachers.diffusers_source import TeacherFolderError, read_folder

    if not source.exists():
        _fail(f"{source}: no such file or folder")
    python = entry is not None or source.suffix == ".py"
    if python:
        if prediction is None:
            _fail("--prediction is required for a python source (velocity | epsilon | v | x0 | edm)")
        if entry is None:
            entry = f"{source.name}:build"
        elif source.suffix == ".py" and ":" not in entry:
            entry = f"{source.name}:{entry}"
    else:
        try:
            read_folder(source, prediction)
        except TeacherFolderError as exc:
            _fail(str(exc))
    target = TEACHER_INPUTS / (source.stem if source.is_file() else source.resolve().name)
    for old in TEACHER_INPUTS.iterdir() if TEACHER_INPUTS.exists() else []:
        if old.is_dir() and old.resolve() != source.resolve():
            shutil.rmtree(old)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.resolve() != target.resolve():
        if source.is_file():
            target.mkdir(exist_ok=True)
            shutil.copyfile(source, target / source.name)
        else:
            shutil.copytree(source, target)
    if python:
        spec = {"kind": "python", "path": str(target), "entry": entry, "prediction": prediction,
                "conditional": conditional}  # fmt: skip
    else:
        spec = {"kind": "diffusers", "path": str(target), "prediction": prediction or "auto"}
    from pydantic import TypeAdapter, ValidationError

    from pipeline.config import TeacherSource

    try:  # every key of the section, defaults included: params.yaml lists each value a stage reads
        spec = TypeAdapter(TeacherSource).validate_python(spec).model_dump(mode="json")
    except ValidationError as exc:
        _fail(f"teacher.source: {exc.errors(include_url=False)[0]['msg']}")
    params = yaml.safe_load(PARAMS.read_text())
    params["teacher"]["source"] = spec
    _write_params(params)
    validate_or_exit()
    console.print(f"imported {source} → {target}; teacher.source = {spec} (the teacher stage wraps it, no training)")


@app.command()
def nets(
    out: Annotated[Path | None, typer.Option(help="also write the table as Markdown here")] = None,
) -> None:
    """Parameter and MAC counts of the paper-scale UNets on CIFAR-10 (3x32x32, 10 classes), built locally."""
    from pipeline.nets.sizes import CIFAR10, PAPER_SIZES, size_row

    rows = [size_row(size, *CIFAR10) for size in PAPER_SIZES]
    table = Table(title="unet2d sizes on CIFAR-10 (3x32x32, 10 classes)")
    header = ["name", "role", "channels", "blocks/level", "attention", "params (M)", "GMACs/sample"]
    for column in header:
        table.add_column(column)
    cells = [[r["name"], r["role"], ",".join(map(str, r["channels"])), str(r["blocks_per_level"]),
              ",".join(map(str, r["attention"])), f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.2f}"]
             for r in rows]  # fmt: skip
    for row in cells:
        table.add_row(*row)
    (console if console.is_terminal else Console(width=140)).print(table)
    if out is not None:
        from pipeline.atomic import atomic_write_text

        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        atomic_write_text(out, "\n".join(lines) + "\n")
        console.print(f"saved {out}")


@app.command()
def clean() -> None:
    """Remove resume checkpoints left in scratch/ by interrupted stages (`dvc gc` cleans DVC's cache)."""
    scratch = Path("scratch")
    size = sum(f.stat().st_size for f in scratch.rglob("*") if f.is_file()) if scratch.exists() else 0
    shutil.rmtree(scratch, ignore_errors=True)
    console.print(f"removed scratch/ ({size / 1e6:.1f} MB)")


# Orchestration (issue 5): the Prefect flow, its deployment, MLflow comparison and registry.


def _targets(values: list[str] | None) -> list[str] | None:
    return [t for v in values or [] for t in v.split(",") if t] or None


@app.command("run")
def run_flow(
    profile_name: Annotated[str | None, typer.Option("--profile", help="switch profile first")] = None,
    targets: Annotated[
        list[str] | None, typer.Option("--targets", "-t", help="stages (and their upstream) to run; repeatable")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="use the first N GPUs (0 = CPU); default: all found")] = None,
    slots: Annotated[int | None, typer.Option(help="stages at once (default: GPUs, or cores ÷ threads)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per stage (default: cores shared)")] = None,
    retries: Annotated[int, typer.Option(help="retries of a failed stage (it resumes from its checkpoint)")] = 1,
    pull: Annotated[bool, typer.Option(help="`dvc repro --pull`: fetch missing inputs from the remote")] = False,
    push: Annotated[bool, typer.Option(help="`dvc push --run-cache` after each stage")] = False,
    register: Annotated[bool, typer.Option(help="register the one-step student and MSD router")] = True,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE for this run only (repeatable), e.g. teacher.lr=0.002: runs as an "
                     "experiment in scratch/experiments/<run>, params.yaml untouched"),
    ] = None,  # fmt: skip
) -> None:
    """Run the DAG as a Prefect flow: parallel where dvc.yaml allows, one device slot per stage."""
    from pipeline.orchestration.experiments import OverrideError, parse_assignments

    try:
        changes = parse_assignments(overrides or [])
    except OverrideError as exc:
        _fail(str(exc))
    if profile_name and not changes:
        profile(profile_name, force=False)
    validate_or_exit()
    check_tracking()
    from pipeline.orchestration.flow import PipelineError, slimstep_flow

    try:
        result = slimstep_flow(
            profile=profile_name if changes and profile_name else "current", targets=_targets(targets),
            overrides=changes or None, gpus=-1 if gpus is None else gpus, slots=slots or 0, threads=threads or 0,
            retries=retries, pull=pull, push=push, register_models=register, root=str(Path.cwd()),
        )  # fmt: skip
    except (PipelineError, ValueError) as exc:
        _fail(str(exc), code=1)
    table = Table(title="Stages")
    table.add_column("stage")
    table.add_column("outcome")
    for stage, outcome in result["stages"].items():
        table.add_row(stage, outcome)
    console.print(table)
    print_leaderboard()
    console.print(f"{result['slots']} device slot(s) (limit {result['limit']}); MLflow run {result['mlflow_run_id']}")


@app.command()
def serve(
    cron: Annotated[str | None, typer.Option(help="schedule, e.g. '0 3 * * *' (default: on demand only)")] = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "slimstep-local",
    gpus: Annotated[int | None, typer.Option(help="default for the deployment's runs")] = None,
    register: Annotated[bool, typer.Option(help="register models at the end of each run")] = True,
) -> None:
    """Serve the flow as a deployment: start (or schedule) runs from the Prefect UI; Ctrl-C stops serving."""
    validate_or_exit()
    from pipeline.orchestration.flow import serve as serve_flow

    serve_flow(cron=cron, name=name, gpus=gpus, register_models=register)


@app.command()
def compare(
    last: Annotated[int, typer.Option(help="the newest N pipeline runs")] = 5,
    runs: Annotated[str | None, typer.Option(help="comma-separated run ids (or unique prefixes)")] = None,
    out: Annotated[Path, typer.Option(help="CSV to write (full field names)")] = Path("reports/compare.csv"),
    metric: Annotated[str | None, typer.Option(help="rank by this metric, lower is better")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON only (for scripts)")] = False,
) -> None:
    """Pipeline runs side by side (key metrics, params that differ); refuses to rank across featurizers."""
    import json

    from pipeline.tracking import records

    try:
        chosen = records.pipeline_runs(last, [r for r in (runs or "").split(",") if r] or None)
        if not chosen:
            _fail("no pipeline runs recorded yet (`slimstep run` or `slimstep repro` make them)")
        comparison = records.compare(chosen, metric or records.RANK_METRIC)
        records.check_comparable(comparison)
    except (LookupError, records.IncomparableRuns) as exc:
        _fail(str(exc))
    frame = comparison.table
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index_label="field")
    if as_json:
        typer.echo(json.dumps(records.as_json(comparison), indent=2, default=str))
        return
    table = Table(title=f"{len(chosen)} pipeline run(s), ranked by {comparison.rank_metric}")
    table.add_column("field", no_wrap=True)
    for column in frame.columns:
        table.add_column(column, justify="right", no_wrap=True)
    for name, row in frame.iterrows():
        table.add_row(str(name), *[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    wide(table)
    console.print(f"saved {out}")


def wide(table: Table) -> None:
    """Print a table at its natural width when piped (rich's default 80 columns would cut names)."""
    if console.is_terminal:
        console.print(table)
        return
    roomy = Console(width=4000)
    natural = Measurement.get(roomy, roomy.options, table).maximum
    Console(width=max(80, natural)).print(table)


@app.command()
def register(
    run: Annotated[str | None, typer.Option(help="attach to this pipeline run (default: a new one)")] = None,
) -> None:
    """Register the workspace's one-step student and MSD router (MLflow pyfunc); move the `champion` alias."""
    from pipeline import tracking
    from pipeline.tracking import registry

    params = validate_or_exit()
    parent = run or tracking.start_pipeline_run(
        f"register-{params.profile}", {"slimstep.profile": params.profile, "slimstep.source": "register"}
    )
    if parent is None:
        _fail("MLflow tracking is off (SLIMSTEP_TRACKING=off)")
    if run is None:
        done = _record_and_register(parent, params.profile)
        tracking.end_pipeline_run(parent, True)
    else:
        done = registry.register_models(parent, Path.cwd(), params.profile)
        for item in done:
            console.print(item.describe())
    if not done:
        _fail("nothing to register: run the pipeline first (needs models/distill@fgd or models/msd@ensemble and eval)")


# Benchmarks (issue 7): benchmarks/run.py does the work; this command only forwards the options.
@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="small sizes, few repeats: <= 5 min on 2 cores")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="run only this benchmark (repeatable); `capacity`, the student-capacity sweep, "
            "runs only when asked for",
        ),
    ] = None,
    repo: Annotated[Path | None, typer.Option(help="a finished digits run whose trained models are timed")] = None,
    runs: Annotated[
        list[Path] | None, typer.Option("--runs", help="a finished run for the claims table (repeatable)")
    ] = None,
    variants: Annotated[
        list[str] | None, typer.Option("--variants", help="quality: run only these ablation variants (repeatable)")
    ] = None,
) -> None:
    """Speed, memory and quality benchmarks: a table each, benchmarks/results/*.json and summary.md."""
    import sys

    if not Path("benchmarks/run.py").exists():
        _fail("run `slimstep bench` from the repository root (benchmarks/run.py not found)")
    args = [sys.executable, "-m", "benchmarks.run", *(["--quick"] if quick else [])]
    args += [arg for name in only or [] for arg in ("--only", name)]
    args += ["--repo", str(repo)] if repo else []
    args += ["--runs", *map(str, runs)] if runs else []
    args += [arg for name in variants or [] for arg in ("--variants", name)]
    raise typer.Exit(subprocess.run(args).returncode)


if __name__ == "__main__":
    app()
