"""Typed schema of params.yaml: one place that says which values are allowed.

Every stage validates the *whole* file before doing any work, so a bad value anywhere stops the chain
with one message that names the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.flow import parse_sampler
from pipeline.nets import NetSpec


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


SamplerName = Annotated[str, Field(description="euler-N | heun-N | dopri5-<tol> | onestep")]


def _check_samplers(names: list[str]) -> list[str]:
    for name in names:
        parse_sampler(name)
    return names


class TrainSection(Section):
    """Keys every training section shares (DESIGN: steps, batch_size, lr, seed)."""

    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(500, gt=0)
    log_every: int = Field(100, gt=0)
    amp: bool = True


class DataSection(Section):
    dataset: Literal["digits", "toy2d", "cifar10", "npz"] = "digits"
    path: str | None = Field(
        None, description="cifar10 folder or .npz file under inputs/ (see `slimstep import-data`)"
    )
    heldout: int = Field(360, gt=0, description="size of the held-out set (digits, npz) ")
    seed: int = Field(0, ge=0)
    toy2d_components: int = Field(8, ge=2, le=64)
    toy2d_radius: float = Field(4.0, gt=0)
    toy2d_std: float = Field(0.25, gt=0)
    toy2d_train: int = Field(8000, gt=0)

    @field_validator("path")
    @classmethod
    def _path_is_relative(cls, value: str | None) -> str | None:
        if value is not None and Path(value).is_absolute():
            raise ValueError(
                "must be a path inside the repository (import it with `slimstep import-data FILE`)"
            )
        return value


class FeaturizerSection(TrainSection):
    width: int = Field(64, ge=8, description="feature dimension")


class TeacherSection(TrainSection):
    net: NetSpec


class EvalSection(Section):
    seeds: int = Field(4, ge=1, description="evaluation noise seeds (FD is mean ± std over them)")
    n_samples: int | None = Field(None, gt=0, description="samples per seed; default = held-out size")
    teacher_samplers: list[SamplerName] = [
        "euler-1",
        "euler-2",
        "euler-4",
        "euler-8",
        "heun-4",
        "dopri5-1e-05",
    ]
    flow_samplers: list[SamplerName] = ["euler-1", "euler-2", "euler-4", "dopri5-1e-05"]
    batch_size: int = Field(512, gt=0)
    knn_k: int = Field(3, ge=1)
    timing_batch: int = Field(256, gt=0)
    grid_per_class: int = Field(8, ge=1, le=32)

    _validate_samplers = field_validator("teacher_samplers", "flow_samplers")(_check_samplers)


class Params(Section):
    profile: str = "digits"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataSection
    featurizer: FeaturizerSection
    teacher: TeacherSection
    eval: EvalSection


class ParamsError(Exception):
    """A params file that does not validate; the message is meant for a person, not a traceback."""


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    if error["type"] == "missing":
        return f"{key}: missing (required)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {value!r}); check the spelling against configs/digits.yaml"
    return f"{key} = {value!r}: {error['msg']}"


def validate_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise ParamsError naming each bad key, its value and what is allowed."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(err)}" for err in exc.errors(include_url=False))
        raise ParamsError(f"{source}: invalid parameters\n{lines}") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (write one with `slimstep profile digits`)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(raw, str(path))
