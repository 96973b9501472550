"""Where a stage runs: device choice, CPU threads and (under torchrun) the DDP process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.errors import DeviceError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → the GPU this process was given (CUDA_VISIBLE_DEVICES, LOCAL_RANK) or the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("params.yaml device = cuda, but torch sees no CUDA device here; set device: auto or cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def device_of(model: object) -> torch.device:
    """Where a model's weights live: inputs go there, results come back to the CPU (parameter-free → CPU)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def configure_threads() -> int:
    """Use the thread count the scheduler gave this stage (SLIMSTEP_THREADS), else torch's default."""
    threads = int(os.environ.get("SLIMSTEP_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over the DDP ranks (what DDP does for the module it wraps), for nets trained
    outside it: DMD's fake net and GAN head update inside the loss, so each rank must take the same step."""
    if world_size() < 2:
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world_size()


def rank_rows(n: int) -> slice:
    """This rank's rows of a global batch of n (all of them without DDP): every rank draws the same global
    batch from the same seed and keeps its own share, so W ranks train on what one process would."""
    size, me = world_size(), rank()
    return slice(me * n // size, (me + 1) * n // size)


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's own collectives (barrier) use the current device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
