"""Typed schema of params.yaml: one place that says which values are allowed.

Every stage validates the *whole* file before doing any work, so a bad value anywhere stops the chain
with one message that names the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.flow import parse_sampler
from pipeline.nets import NetSpec

TEACHER_DIR = "models/teacher"


class Section(BaseModel):
    # No float key may be NaN or infinite: `.inf` as a loss weight trains a NaN model that looks finished.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def inside_repository(value: str | None, under: str | None = None) -> str | None:
    """A relative path that stays inside the repository (and under `under`, when given), where DVC tracks it."""
    if value is None:
        return None
    path = Path(value)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError("must be a relative path inside the repository, without `..` "
                         "(copy outside files in with `slimstep import-data FILE`)")  # fmt: skip
    if under is not None and (not path.parts or path.parts[0] != under):
        raise ValueError(f"must be a path under {under}/ (import it with `slimstep import-data FILE`)")
    return value


SamplerName = Annotated[str, Field(description="euler-N[-wP] | heun-N[-wP] | dopri5-<tol> | onestep")]


def _check_samplers(names: list[str]) -> list[str]:
    for name in names:
        parse_sampler(name)
    return names


def _not_below(low_key: str):  # noqa: ANN202 - a pydantic field validator
    """Validator for the upper end of a range; it sits on that field so the error names its dotted key."""

    def check(value: float, info: ValidationInfo) -> float:
        low = info.data.get(low_key)
        if low is not None and value < low:
            raise ValueError(f"{low_key} ({low}) must not exceed {info.field_name} ({value})")
        return value

    return check


Steps = Annotated[int, Field(gt=0)]
BatchSize = Annotated[int, Field(gt=0)]
LearningRate = Annotated[float, Field(gt=0, lt=1)]
WarmupSteps = Annotated[int, Field(ge=0)]
EmaDecay = Annotated[float, Field(ge=0, lt=1)]
Every = Annotated[int, Field(gt=0)]


class TrainSection(Section):
    """Keys every training section shares (steps, batch_size, lr, seed, …); each section sets its own defaults."""

    steps: Steps
    batch_size: BatchSize = 256
    lr: LearningRate
    seed: int = Field(0, ge=0)
    warmup_steps: WarmupSteps = 0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: EmaDecay = 0.999
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: Every = 1000
    log_every: Every = 100
    amp: bool = True


class DataSection(Section):
    dataset: Literal["digits", "mnist", "toy2d", "cifar10", "npz"] = "digits"
    path: str | None = Field(None, description="cifar10 folder or .npz file under inputs/ (see `slimstep import-data`)")
    heldout: int = Field(360, gt=0, description="size of the held-out set (digits, mnist, npz)")
    seed: int = Field(0, ge=0)
    toy2d_components: int = Field(8, ge=2, le=64)
    toy2d_radius: float = Field(4.0, gt=0)
    toy2d_std: float = Field(0.25, gt=0)
    toy2d_train: int = Field(8000, gt=0)

    @field_validator("path")
    @classmethod
    def _path_is_relative(cls, value: str | None) -> str | None:
        return inside_repository(value, under="inputs")


class FeaturizerSection(TrainSection):
    steps: Steps = 1500
    batch_size: BatchSize = 128
    lr: LearningRate = 2e-3
    warmup_steps: WarmupSteps = 50
    ema_decay: EmaDecay = 0.99
    checkpoint_every: Every = 500
    width: int = Field(64, ge=8, description="feature dimension")


class TrainedTeacher(Section):
    """The default: the `teacher` stage trains a 1-rectified flow (docs/methods.md §1)."""

    kind: Literal["train"] = "train"


def _imported_path(value: str) -> str:
    if Path(value).is_absolute() or not Path(value).parts or Path(value).parts[0] != "inputs":
        raise ValueError("must be a folder under inputs/ (import it with `slimstep import-teacher PATH`)")
    return value


class DiffusersTeacher(Section):
    """A diffusers UNet2DModel folder under inputs/; its scheduler config gives the prediction type."""

    kind: Literal["diffusers"]
    path: str
    prediction: Literal["auto", "epsilon", "v_prediction", "sample", "flow"] = Field(
        "auto", description="auto = the scheduler config's prediction_type (flow for a FlowMatch scheduler)"
    )

    _path_ok = field_validator("path")(_imported_path)


class BetaSchedule(Section):
    """A VP model's beta schedule in diffusers' terms (DDPMScheduler computes the alpha-bar table)."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)


class PythonTeacher(Section):
    """`entry` = FILE.py:FUNCTION inside `path`; FUNCTION(folder or None) returns an nn.Module (pipeline/teachers)."""

    kind: Literal["python"]
    path: str
    entry: str = Field(pattern=r"^[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*$")
    prediction: Literal["velocity", "epsilon", "v", "x0", "edm"]
    conditional: bool = Field(True, description="false: the net ignores labels and serves one label")
    schedule: BetaSchedule = BetaSchedule()
    sigma_min: float = Field(0.002, gt=0, description="edm: the denoiser's trained sigma range")
    sigma_max: float = Field(80.0, gt=0)

    _path_ok = field_validator("path")(_imported_path)
    _sigma_range = field_validator("sigma_max")(_not_below("sigma_min"))


TeacherSource = Annotated[TrainedTeacher | DiffusersTeacher | PythonTeacher, Field(discriminator="kind")]


class TeacherSection(TrainSection):
    """The teacher: trained here (`source.kind: train`, from `net` and the training keys) or imported."""

    steps: Steps = 20_000
    lr: LearningRate = 1e-3
    warmup_steps: WarmupSteps = 500
    net: NetSpec = NetSpec(kind="mlp", width=512, depth=4)
    source: TeacherSource = TrainedTeacher()


class PairSet(Section):
    """One pair set: whose ODE is solved and how, and the file the solver needs (DVC deps are static)."""

    solver: str = Field("dopri5-1e-04", description="a sampler name (euler-N[-wP] | heun-N[-wP] | dopri5-TOL) or rl")
    policy: str = Field(TEACHER_DIR, description="extra dependency: models/stepper for rl, else models/teacher")
    flow: str = Field(TEACHER_DIR, description="the model whose ODE is solved: the teacher, or a 2-flow student "
                      "such as models/anneal@slimflow (regenerated pairs, docs/methods.md §4)")  # fmt: skip

    @field_validator("solver")
    @classmethod
    def _solver_known(cls, value: str) -> str:
        if value != "rl":
            parse_sampler(value)
        return value

    _paths_inside = field_validator("policy", "flow")(lambda value: inside_repository(value))


class PairsSection(Section):
    n_pairs: int = Field(100_000, gt=0)
    shard_size: int = Field(10_000, gt=0)
    solve_batch: int = Field(1000, gt=0)
    seed: int = Field(1, ge=0)
    fp16: bool = False
    sets: dict[str, PairSet] = {"teacher": PairSet()}
    train_set: str = Field("teacher", description="the pair set students train on")

    # Cross-field checks sit on the later field, so the error names that key (pairs.solve_batch, …).
    @field_validator("solve_batch")
    @classmethod
    def _divides_shard(cls, value: int, info: ValidationInfo) -> int:
        shard = info.data.get("shard_size")
        if shard is not None and shard % value:
            raise ValueError(f"shard_size ({shard}) must be a multiple of solve_batch ({value})")
        return value

    @field_validator("train_set")
    @classmethod
    def _known_set(cls, value: str, info: ValidationInfo) -> str:
        sets = info.data.get("sets")
        if sets is not None and value not in sets:
            raise ValueError(f"train_set {value!r} is not one of sets {sorted(sets)}")
        if sets is not None and sets[value].flow != TEACHER_DIR:
            raise ValueError(f"train_set {value!r} is solved by {sets[value].flow}, which is trained on the train set "
                             f"(a cycle): pick a set whose flow is {TEACHER_DIR}")  # fmt: skip
        return value


class AnnealSection(TrainSection):
    """Annealing Reflow (docs/methods.md §3); `anneal@reflow` trains the same student with beta = 0."""

    steps: Steps = 10_000
    lr: LearningRate = 2e-3
    warmup_steps: WarmupSteps = 200
    net: NetSpec = NetSpec(kind="resmlp", width=180, depth=2)
    schedule: Literal["linear", "exp", "cos", "constant"] = "linear"
    window_frac: float = Field(0.375, gt=0, le=1, description="W as a fraction of steps")
    beta_constant: float = Field(0.0, ge=0, le=1, description="beta of the constant schedule")
    flip: bool = Field(False, description="flip image and noise together (only for flip-symmetric images)")


class DistillSection(TrainSection):
    """Flow-Guided Distillation (docs/methods.md §4); `distill@naive-paper` / `distill@naive` = pair term
    only, random init, distillation's steps / annealing + distillation's steps."""

    steps: Steps = 5000
    lr: LearningRate = 2e-3
    guide: Literal["anneal", "teacher"] = "anneal"
    guide_steps: int = Field(1, ge=1, le=64, description="Euler steps the guide takes from s to 1")
    s_min: float = Field(0.2, ge=0.001, le=1)
    s_max: float = Field(0.8, ge=0.001, le=1)
    distance: Literal["l2", "pseudo_huber", "lpips"] = "l2"
    huber_c: float | None = Field(None, gt=0)
    lpips_weights: str | None = None
    guidance_weight: float = Field(1.0, ge=0)
    pair_set: str = Field("teacher", description="the pair set of distill@fgd's and the MSD students' pair term: "
                          "the teacher's, or one regenerated by the annealed student")  # fmt: skip

    _s_range = field_validator("s_max")(_not_below("s_min"))
    _weights_inside = field_validator("lpips_weights")(lambda value: inside_repository(value))


class MsdSection(TrainSection):
    """Multi-Student Distillation (docs/methods.md §5): one `msd@k` stage per entry of `students`."""

    steps: Steps = 5000
    lr: LearningRate = 2e-3
    students: list[int] = Field([0, 1], min_length=1, description="student ids 0..K-1; K = its length")
    partition: Literal["consecutive", "kmeans", "random"] = "consecutive"
    partition_seed: int = Field(0, ge=0)
    objective: Literal["fgd", "dmd"] = "fgd"
    net: NetSpec | None = Field(None, description="student net; default = the anneal student's")
    tsm_steps: int = Field(0, ge=0, description="Teacher Score Matching steps before distillation (0 = off)")
    fake_lr: float | None = Field(None, gt=0, description="dmd: fake-score net LR; null = the generator's (DMD2)")
    fake_updates: int = Field(5, ge=1, description="dmd: fake-net updates per generator update (DMD2's TTUR)")
    fake_grad_clip: float = Field(10.0, ge=0, description="dmd: gradient-norm clip of the fake net (0 = off)")
    regression_weight: float = Field(0.25, ge=0)
    dm_time: Literal["karras", "uniform"] = Field(
        "karras", description="dmd timesteps: Karras index fraction ~ U(t_min, t_max) mapped to t (DMD2), or t ~ U"
    )
    t_min: float = Field(0.02, ge=0, le=1)
    t_max: float = Field(0.98, ge=0, le=1)
    gan_steps: int = Field(0, ge=0, description="dmd: steps of the second phase with the GAN head on (0 = off)")
    gan_lr: float = Field(2e-4, gt=0, lt=1, description="dmd: LR of the GAN phase (generator; fake net scaled alike)")
    gan_d_weight: float = Field(1e-2, ge=0, description="dmd: weight of the discriminator loss in the fake-net loss")
    gan_g_weight: float = Field(3e-3, ge=0, description="dmd: weight of the generator's adversarial loss")
    gan_width: int = Field(256, ge=8, description="dmd: hidden width of the GAN classifier head")

    _t_range = field_validator("t_max")(_not_below("t_min"))

    @field_validator("gan_steps")
    @classmethod
    def _gan_needs_dmd(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("objective") != "dmd":
            raise ValueError("the GAN phase belongs to objective dmd; set msd.objective: dmd or gan_steps: 0")
        return value

    @field_validator("students")
    @classmethod
    def _ids(cls, value: list[int]) -> list[int]:
        if value != list(range(len(value))):
            raise ValueError(f"students must be 0..K-1 in order, got {value}")
        return value


class MeanflowSection(TrainSection):
    """MeanFlow from scratch (docs/methods.md §9); steps/batch default to the compute-matched naive student's."""

    steps: Steps | None = Field(None, description="default: anneal.steps + distill.steps")
    batch_size: BatchSize | None = Field(None, description="default: distill.batch_size")
    lr: LearningRate = 2e-3
    warmup_steps: WarmupSteps = 200
    flow_fraction: float = Field(0.75, ge=0, le=1, description="share of samples with r = t (plain flow matching)")
    time_mean: float = Field(-0.4, description="logit-normal mean of the paper's times (data 0, noise 1)")
    time_std: float = Field(1.0, gt=0, description="logit-normal std of the paper's times")
    weight_power: float = Field(1.0, ge=0, description="adaptive loss weight 1 / (err + c)^p; 0 = plain MSE")
    weight_c: float = Field(1e-3, gt=0, description="c of the adaptive loss weight")


class StepperSection(Section):
    """RL step-size controller on the teacher ODE (docs/methods.md §6); see pipeline/stepsize."""

    seed: int = Field(0, ge=0)
    total_timesteps: int = Field(10_000, gt=0, description="DQN environment steps")
    noise_batches: int = Field(8, ge=1, description="training noise batches (episodes cycle through them)")
    batch_size: int = Field(64, ge=1, description="noises per episode (one solve batch)")
    eval_batch: int = Field(256, ge=1, description="held-out noises for the NFE-error table")
    n_actions: int = Field(6, ge=2, le=32)
    h_min: float = Field(1 / 32, gt=0, le=1, description="smallest step, fraction of the solve (see warp)")
    h_max: float = Field(1.0, gt=0, le=1)
    nfe_cap: int = Field(64, ge=3)
    lam: float = Field(0.01, ge=0, description="reward cost per network call")
    err_scale: float = Field(0.01, gt=0)
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    net_arch: list[int] = Field([64, 64], min_length=1)
    warp: float = Field(2.0, ge=1, description="time grid of the steps: 1 uniform in t, 2 packed toward t = 1")

    _h_range = field_validator("h_max")(_not_below("h_min"))


class FidSection(Section):
    """FID/KID with a user's Inception TorchScript file (docs/methods.md §7); off when `eval.fid` is null."""

    inception: str = Field(description="TorchScript net(uint8 NCHW RGB, return_features=True) -> (N, 2048), "
                           "e.g. inception-2015-12-05.pt; keep it under inputs/ so DVC hashes it")  # fmt: skip
    reference: str = Field("train", description="train (features of the train set) or an .npz with mu, sigma")
    n_samples: int = Field(10000, ge=2, description="generated samples per model x sampler (50 000 at paper scale)")

    @field_validator("reference")
    @classmethod
    def _reference_kind(cls, value: str) -> str:
        if value != "train" and not value.endswith(".npz"):
            raise ValueError("allowed: train, or a path to an .npz holding mu and sigma")
        return value


class EvalSection(Section):
    seeds: int = Field(4, ge=1, description="evaluation noise seeds (FD is mean ± std over them)")
    n_samples: int | None = Field(None, gt=0, description="samples per seed; default = held-out size")
    teacher_samplers: list[SamplerName] = [
        "euler-1",
        "euler-2",
        "euler-4",
        "euler-8",
        "heun-4",
        "heun-8",
        "dopri5-1e-03",
        "dopri5-1e-05",
    ]
    flow_samplers: list[SamplerName] = ["euler-1", "euler-2", "euler-4", "dopri5-1e-05"]
    batch_size: int = Field(512, gt=0)
    knn_k: int = Field(3, ge=1)
    timing_batch: int = Field(256, gt=0)
    grid_per_class: int = Field(8, ge=1, le=32)
    fid: FidSection | None = Field(None, description="FID/KID in a local Inception net's features (null = off)")

    _validate_samplers = field_validator("teacher_samplers", "flow_samplers")(_check_samplers)


class Params(Section):
    profile: str = "digits"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataSection = DataSection()
    featurizer: FeaturizerSection = FeaturizerSection()
    teacher: TeacherSection = TeacherSection()
    stepper: StepperSection = StepperSection()
    pairs: PairsSection = PairsSection()
    anneal: AnnealSection = AnnealSection()
    distill: DistillSection = DistillSection()
    msd: MsdSection = MsdSection()
    meanflow: MeanflowSection = MeanflowSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _distill_pairs_exist(self) -> Params:
        if self.distill.pair_set not in self.pairs.sets:
            raise ValueError(f"distill.pair_set {self.distill.pair_set!r} is not one of pairs.sets "
                             f"{sorted(self.pairs.sets)}")  # fmt: skip
        classes = known_class_count(self.data)
        if classes is not None and len(self.msd.students) > classes:
            raise ValueError(f"msd.students: {len(self.msd.students)} students for the {classes} classes of "
                             f"data.dataset = {self.data.dataset}; each student needs at least one class")  # fmt: skip
        return self


def known_class_count(data: DataSection) -> int | None:
    """Classes of a built-in data set (None for a user's .npz: the msd stage checks it against data/meta.json)."""
    return {"digits": 10, "cifar10": 10, "toy2d": data.toy2d_components}.get(data.dataset)


class ParamsError(Exception):
    """A params file that does not validate; the message is meant for a person, not a traceback."""


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    if error["type"] == "missing":
        return f"{key}: missing (required)"
    if not error["loc"]:  # a check across sections: its message names the keys
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {value!r}); the schema in pipeline/config.py lists every key"
    return f"{key} = {value!r}: {error['msg']}"


def validate_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise ParamsError naming each bad key, its value and what is allowed."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(err)}" for err in exc.errors(include_url=False))
        raise ParamsError(f"{source}: invalid parameters\n{lines}") from None
    missing = sorted({_absent_prefix(raw, key) for key in _leaf_keys(params.model_dump(mode="json")) - _leaf_keys(raw)})
    if missing:
        lines = "\n".join(f"  - {key}: missing (required)" for key in missing)
        raise ParamsError(f"{source}: invalid parameters (a params file lists every key, so DVC sees every value "
                          f"a stage reads; `slimstep profile NAME` writes a complete one)\n{lines}")  # fmt: skip
    return params


def _leaf_keys(tree: Any, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves (an empty mapping counts as a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix}
    return {key for name, value in tree.items() for key in _leaf_keys(value, f"{prefix}.{name}" if prefix else name)}


def _absent_prefix(raw: dict[str, Any], key: str) -> str:
    """The shortest part of a dotted key that the raw mapping lacks (`eval`, not each key under it)."""
    node, parts = raw, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            return ".".join(parts[: depth + 1])
        node = node[part]
    return key


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (write one with `slimstep profile digits`)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(raw, str(path))
