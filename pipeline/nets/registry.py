"""Name -> class registry of velocity nets and the one place that builds them from a NetSpec."""

from torch import nn

from pipeline.nets.mlp import MLP, ResMLP
from pipeline.nets.spec import NetSpec
from pipeline.nets.unet import UNet
from pipeline.nets.unet2d import UNet2D

NETS: dict[str, type[nn.Module]] = {"mlp": MLP, "resmlp": ResMLP, "unet": UNet, "unet2d": UNet2D}


def build_net(spec: NetSpec, data_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A velocity net v(x, t, label) for data of shape `data_shape`: x (B, *data_shape), t (B,) in [0, 1],
    label (B,) long in [0, num_classes) -> (B, *data_shape). Weights come from the torch global RNG, so the
    same seed gives the same weights. Raises ValueError where the kind does not fit the data (unet on 1-D)."""
    return NETS[spec.kind](spec, tuple(data_shape), num_classes)
