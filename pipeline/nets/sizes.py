"""The paper-scale UNet sizes on CIFAR-10 (3x32x32, 10 classes), as NetSpecs: what `slimstep nets` counts."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.nets.counting import count_macs, count_params
from pipeline.nets.registry import build_net
from pipeline.nets.spec import NetSpec

CIFAR10 = ((3, 32, 32), 10)


@dataclass(frozen=True)
class NetSize:
    name: str
    role: str
    spec: NetSpec


# Attention at 16x16 and dropout as in DDPM / DDPM++ on CIFAR-10; the time embedding is 4x the first width.
PAPER_SIZES = [
    NetSize("ddpm", "teacher (DDPM's CIFAR-10 UNet, 35.7M published)",
            NetSpec(kind="unet2d", channels=[128, 256, 256, 256], depth=2, emb_dim=512, dropout=0.1)),
    NetSize("ddpmpp", "teacher (DDPM++ depth: 4 blocks per level, 61.8M published)",
            NetSpec(kind="unet2d", channels=[128, 256, 256, 256], depth=4, emb_dim=512, dropout=0.15)),
    NetSize("student-28m", "student (~28M)",
            NetSpec(kind="unet2d", channels=[128, 128, 256, 256], depth=2, emb_dim=512, dropout=0.1)),
    NetSize("student-16m", "student (~16M)",
            NetSpec(kind="unet2d", channels=[96, 96, 192, 192], depth=2, emb_dim=384, dropout=0.1)),
]  # fmt: skip


def size_row(size: NetSize, data_shape: tuple[int, ...], num_classes: int) -> dict[str, object]:
    """Parameters and MACs per sample of one size, counted on a freshly built net (nothing is downloaded)."""
    net = build_net(size.spec, data_shape, num_classes)
    return {
        "name": size.name, "role": size.role, "channels": size.spec.channels, "blocks_per_level": size.spec.depth,
        "attention": size.spec.attention, "params": count_params(net), "macs": count_macs(net, data_shape, num_classes),
    }  # fmt: skip
