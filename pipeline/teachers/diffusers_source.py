"""A local folder saved by diffusers (a `UNet2DModel` + its scheduler config) as slimstep's teacher.

Accepted layouts: a pipeline folder (`DDPMPipeline.save_pretrained`: `unet/config.json`, `unet/<weights>`,
`scheduler/scheduler_config.json`) or a bare UNet folder with `scheduler_config.json` beside its config.
The scheduler says how the net was trained: a VP table (`alphas_cumprod`) with `prediction_type`
epsilon / v_prediction / sample, or a FlowMatch scheduler. Weights are read from safetensors or with
`torch.load(weights_only=True)`; nothing is unpickled and nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.nets.unet2d import DiffusersUNet, _needs_diffusers
from pipeline.teachers.conversion import FlowMatchingVelocity, VPVelocity

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers' prediction_type -> the conversion's name for it; "flow" = a FlowMatch scheduler.
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0", "flow": "flow"}


class TeacherFolderError(ValueError):
    """A teacher folder that is not what it claims; the message is one line naming the file."""


@dataclass
class DiffusersFolder:
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    weights: Path
    prediction: str  # a key of PREDICTIONS

    @property
    def scheduler_class(self) -> str:
        return str(self.scheduler_config.get("_class_name", "?"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TeacherFolderError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TeacherFolderError(f"{path}: expected a JSON object")
    return value


def _first(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def read_folder(folder: Path, prediction: str | None = None) -> DiffusersFolder:
    """Check a diffusers folder's files without loading weights; `prediction` overrides the scheduler's."""
    if not folder.is_dir():
        raise TeacherFolderError(f"{folder}: no such folder (expected a diffusers model folder)")
    config_path = _first([folder / "unet" / "config.json", folder / "config.json"])
    if config_path is None:
        raise TeacherFolderError(f"{folder}: no unet/config.json or config.json (expected a diffusers UNet2DModel "
                                 "folder, e.g. what DDPMPipeline.save_pretrained writes)")  # fmt: skip
    unet_config = _read_json(config_path)
    if unet_config.get("_class_name") != "UNet2DModel":
        raise TeacherFolderError(f"{config_path}: _class_name is {unet_config.get('_class_name')!r}, expected "
                                 "'UNet2DModel'")  # fmt: skip
    if unet_config.get("class_embed_type") is not None:
        raise TeacherFolderError(f"{config_path}: class_embed_type {unet_config['class_embed_type']!r} is not "
                                 "supported (class labels must come through num_class_embeds)")  # fmt: skip
    weights = _first([config_path.parent / name for name in WEIGHT_FILES])
    if weights is None:
        raise TeacherFolderError(f"{config_path.parent}: no weights ({' or '.join(WEIGHT_FILES)})")
    scheduler_path = _first(
        [folder / "scheduler" / "scheduler_config.json", config_path.parent / "scheduler_config.json"]
    )
    if scheduler_path is None:
        raise TeacherFolderError(f"{folder}: no scheduler/scheduler_config.json (the scheduler says how the UNet "
                                 "was trained: its noise table and prediction type)")  # fmt: skip
    scheduler_config = _read_json(scheduler_path)
    name = str(scheduler_config.get("_class_name", ""))
    declared = "flow" if name.startswith("FlowMatch") else scheduler_config.get("prediction_type", "epsilon")
    chosen = prediction or declared
    if chosen not in PREDICTIONS:
        source = "--prediction" if prediction else f"{scheduler_path}: prediction_type"
        raise TeacherFolderError(f"{source} {chosen!r} is not a known prediction type (expected one of "
                                 f"{', '.join(PREDICTIONS)})")  # fmt: skip
    if chosen != "flow" and name.startswith("FlowMatch"):
        raise TeacherFolderError(f"{scheduler_path}: {name} is a flow-matching scheduler; its prediction is 'flow'")
    return DiffusersFolder(unet_config, scheduler_config, weights, chosen)


def alphas_cumprod(scheduler_config: dict[str, Any], where: str = "scheduler_config.json") -> torch.Tensor:
    """The VP noise table (T,) a scheduler config defines, computed by diffusers itself."""
    diffusers = _needs_diffusers()
    name = str(scheduler_config.get("_class_name", "DDPMScheduler"))
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None:
        raise TeacherFolderError(f"{where}: unknown scheduler class {name!r}")
    scheduler = scheduler_class.from_config(scheduler_config)
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        raise TeacherFolderError(f"{where}: {name} has no alpha-bar table (VP); for an EDM/VE model use the "
                                 "python source with prediction edm")  # fmt: skip
    return torch.as_tensor(table, dtype=torch.float64)


def build_wrapper(unet_config: dict[str, Any], scheduler_config: dict[str, Any], prediction: str) -> nn.Module:
    """The velocity wrapper around a freshly built (untrained) UNet; weights are loaded separately."""
    unet = DiffusersUNet(_needs_diffusers().UNet2DModel.from_config(unet_config))
    if prediction == "flow":
        return FlowMatchingVelocity(unet, float(scheduler_config.get("num_train_timesteps", 1000)))
    return VPVelocity(unet, alphas_cumprod(scheduler_config), PREDICTIONS[prediction])  # type: ignore[arg-type]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything torch refuses is a bad file for the user
        raise TeacherFolderError(
            f"{path}: not a plain state dict ({type(exc).__name__}); save it as safetensors"
        ) from None


def load_folder(folder: Path, prediction: str | None = None) -> tuple[nn.Module, DiffusersFolder]:
    """The folder's UNet with its weights, wrapped as v(x, t, label); one-line errors for bad files."""
    found = read_folder(folder, prediction)
    try:
        wrapper = build_wrapper(found.unet_config, found.scheduler_config, found.prediction)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, TeacherFolderError):
            raise
        raise TeacherFolderError(f"{folder}: UNet2DModel cannot be built from its config ({exc})") from None
    try:
        wrapper.net.unet.load_state_dict(read_weights(found.weights))
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise TeacherFolderError(f"{found.weights}: weights do not fit its config.json ({first})") from None
    return wrapper, found


def data_mismatch(unet_config: dict[str, Any], data_shape: tuple[int, ...], num_classes: int) -> str | None:
    """Why this UNet cannot serve data of this shape and class count (None when it can)."""
    if len(data_shape) != 3:
        return f"a UNet2DModel needs image data (C, H, W); the data are {tuple(data_shape)}"
    channels, height, width = data_shape
    for key in ("in_channels", "out_channels"):
        if unet_config.get(key, 3) != channels:
            return f"{key} is {unet_config.get(key, 3)}, the data have {channels} channels"
    size = unet_config.get("sample_size")
    sides = tuple(size) if isinstance(size, list | tuple) else (size, size)
    if size is not None and sides != (height, width):
        return f"sample_size is {size}, the data are {height}x{width}"
    classes = unet_config.get("num_class_embeds")
    if classes is None and num_classes > 1:
        return (f"the UNet is unconditional (no num_class_embeds), the data have {num_classes} classes: import "
                "unlabelled data or a class-conditional teacher")  # fmt: skip
    if classes is not None and classes != num_classes:
        return f"num_class_embeds is {classes}, the data have {num_classes} classes"
    return None
