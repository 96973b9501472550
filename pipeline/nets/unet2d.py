"""The image-scale UNet family (DDPM++ / ADM style) through diffusers' `UNet2DModel`, as v(x, t, label).

Several residual blocks per level (`depth`), attention at the resolutions in `attention` (16x16 in the
papers), dropout, a class embedding (`num_class_embeds`) added to the time embedding. diffusers is an
optional extra, imported only when such a net is built.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from pipeline.nets.spec import NetSpec

# slimstep's t in [0, 1] enters the sinusoidal time embedding as t * 999, the scale the official Rectified
# Flow checkpoints use (their DDPM++ was built for integer DDPM timesteps).
TIME_SCALE = 999.0


def _needs_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("this net needs diffusers: pip install 'slimstep[diffusers]'") from None
    return diffusers


class DiffusersUNet(nn.Module):
    """A `UNet2DModel` called as net(x, time, label) with time in the model's own units; an unconditional
    UNet (no `num_class_embeds`) ignores the label, so it serves one label."""

    def __init__(self, unet: nn.Module, time_scale: float = 1.0) -> None:
        super().__init__()
        self.unet, self.time_scale = unet, time_scale
        self.conditional = unet.config.num_class_embeds is not None

    def forward(self, x: Tensor, time: Tensor, label: Tensor) -> Tensor:
        """x (B, C, H, W), time (B,), label (B,) long -> (B, C, H, W)."""
        labels = label if self.conditional else None
        return self.unet(x, time * self.time_scale, class_labels=labels).sample


def unet2d_config(spec: NetSpec, data_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """The `UNet2DModel` keyword arguments a NetSpec of kind unet2d describes for this data."""
    if len(data_shape) != 3:
        raise ValueError(f"unet2d needs image data (C, H, W); got data shape {tuple(data_shape)}")
    channels, height, width = data_shape
    factor = 2 ** (len(spec.channels) - 1)
    if height != width or height % factor:
        raise ValueError(f"unet2d with {len(spec.channels)} levels needs square images with a side divisible "
                         f"by {factor}; got {height}x{width}")  # fmt: skip
    sizes = [height // 2**level for level in range(len(spec.channels))]
    attend = [size in spec.attention for size in sizes]
    return {
        "sample_size": height, "in_channels": channels, "out_channels": channels,
        "block_out_channels": tuple(spec.channels), "layers_per_block": spec.depth, "dropout": spec.dropout,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        "attention_head_dim": None,  # one head per attention layer, as DDPM++
        "norm_num_groups": math.gcd(32, *spec.channels), "time_embedding_dim": spec.emb_dim,
        "num_class_embeds": num_classes,
    }  # fmt: skip


class UNet2D(DiffusersUNet):
    """A DDPM++/ADM-style velocity net sized by a NetSpec (channels per level, `depth` blocks per level)."""

    def __init__(self, spec: NetSpec, data_shape: tuple[int, ...], num_classes: int) -> None:
        unet = _needs_diffusers().UNet2DModel(**unet2d_config(spec, data_shape, num_classes))
        super().__init__(unet, TIME_SCALE)
