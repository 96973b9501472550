"""Size and cost of a velocity net: parameters and multiply-accumulates per sample."""

import torch
from torch import Tensor, nn


def count_params(net: nn.Module) -> int:
    """Number of parameters (frozen ones too: an EMA copy or a loaded model has the same size)."""
    return sum(p.numel() for p in net.parameters())


def _layer_macs(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> int:
    """MACs of one call of a Linear / Conv2d / ConvTranspose2d layer, from its actual input and output."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    # One weight slice: (c_in / groups) * kh * kw for Conv2d, (c_out / groups) * kh * kw for ConvTranspose2d.
    kernel = module.weight[0].numel()
    if isinstance(module, nn.ConvTranspose2d):
        return inputs[0].numel() * kernel
    return output.numel() * kernel


@torch.no_grad()
def count_macs(net: nn.Module, data_shape: tuple[int, ...], num_classes: int) -> int:
    """Multiply-accumulates of one forward v(x, t, label) for one sample, counted in Linear and conv layers.

    Measured with forward hooks on a batch of 1 (x zeros, t = 0.5, the last class), so layers that run
    several times (or not at all) count as they run. Norms, activations and embedding look-ups are free.
    """
    param = next(net.parameters())
    x = torch.zeros(1, *data_shape, device=param.device, dtype=param.dtype)
    t = torch.full((1,), 0.5, device=param.device, dtype=param.dtype)
    label = torch.full((1,), num_classes - 1, dtype=torch.long, device=param.device)
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, inputs, output)

    layers = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, layers)]
    was_training = net.training
    try:
        net.eval()
        net(x, t, label)
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return total
