"""Velocity nets: shapes, conditioning, counts, determinism, spec validation."""

import math

import pytest
import torch
from pydantic import ValidationError

from pipeline.nets import NETS, NetSpec, build_net, count_macs, count_params

torch.set_num_threads(2)

DATASETS = {"digits": ((1, 8, 8), 10), "toy2d": ((2,), 8), "cifar": ((3, 32, 32), 10)}
CASES = [
    (kind, name)
    for kind in NETS
    for name, (shape, _) in DATASETS.items()
    if kind not in ("unet", "unet2d") or len(shape) == 3
]


def _inputs(shape: tuple[int, ...], num_classes: int, batch: int = 16) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen)
    t = torch.rand(batch, generator=gen)
    label = torch.arange(batch) % num_classes  # every class appears, so every embedding row gets a gradient
    return x, t, label


def _build(kind: str, name: str, **spec) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    shape, num_classes = DATASETS[name]
    torch.manual_seed(0)
    return build_net(NetSpec(kind=kind, **spec), shape, num_classes), shape, num_classes


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_output_shape_and_conditioning(kind: str, name: str) -> None:
    net, shape, num_classes = _build(kind, name)
    x, t, label = _inputs(shape, num_classes, batch=4)
    with torch.no_grad():
        v = net(x, t, label)
        other_t = net(x, 1.0 - t, label)
        other_label = net(x, t, (label + 1) % num_classes)
    assert v.shape == x.shape
    assert torch.isfinite(v).all()
    assert not torch.allclose(v, other_t), "output ignores t"
    assert not torch.allclose(v, other_label), "output ignores the label"


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_gradients_reach_every_parameter(kind: str, name: str) -> None:
    net, shape, num_classes = _build(kind, name, width=32, depth=2, channels=[8, 16], emb_dim=8)
    x, t, label = _inputs(shape, num_classes)
    net(x, t, label).square().mean().backward()
    for pname, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("kind", list(NETS))
def test_same_seed_same_weights(kind: str) -> None:
    first, _, _ = _build(kind, "digits")
    second, _, _ = _build(kind, "digits")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_count_params_is_sum_of_numel() -> None:
    net, _, _ = _build("resmlp", "digits")
    assert count_params(net) == sum(p.numel() for p in net.parameters())
    total = count_params(net)
    net.requires_grad_(False)  # a frozen copy (EMA, loaded model) has the same size
    assert count_params(net) == total


def test_count_macs_of_plain_mlp_by_hand() -> None:
    width, depth, emb, dim = 32, 3, 8, 2
    net, shape, num_classes = _build("mlp", "toy2d", width=width, depth=depth, emb_dim=emb)
    time_mlp = emb * emb + emb * emb  # sinusoid features (emb) -> emb -> emb
    body = (dim + emb) * width + (depth - 1) * width * width + width * dim
    assert count_macs(net, shape, num_classes) == time_mlp + body


def test_count_macs_of_one_level_unet_by_hand() -> None:
    net, shape, num_classes = _build("unet", "digits", channels=[8], emb_dim=4)
    pixels, c = 8 * 8, 8
    cond = 4 * 4 + 4 * 4 + 4 * 2 * c  # time MLP, then FiLM scale and shift
    convs = pixels * (1 * 9 * c + 2 * c * 9 * c + c * 9 * 1)  # stem, block's two convs, head
    net.train()
    assert count_macs(net, shape, num_classes) == cond + convs
    assert net.training, "count_macs must restore the training mode"


def test_unet_rejects_non_images() -> None:
    with pytest.raises(ValueError, match="image"):
        build_net(NetSpec(kind="unet"), (2,), 8)
    with pytest.raises(ValueError, match="divisible"):
        build_net(NetSpec(kind="unet", channels=[8, 8, 8, 8, 8]), (1, 8, 8), 10)


def test_unet_three_levels_on_digits() -> None:
    net, shape, num_classes = _build("unet", "digits", channels=[8, 16, 32])
    x, t, label = _inputs(shape, num_classes, batch=2)
    assert net(x, t, label).shape == x.shape


def test_dropout_is_random_in_training_only() -> None:
    net, shape, num_classes = _build("resmlp", "digits", dropout=0.5)
    x, t, label = _inputs(shape, num_classes, batch=4)
    assert not torch.equal(net(x, t, label), net(x, t, label))
    net.eval()
    assert torch.equal(net(x, t, label), net(x, t, label))


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "mlp", "colour": "red"},
        {"kind": "transformer"},
        {"kind": "mlp", "width": 4},
        {"kind": "mlp", "depth": 0},
        {"kind": "mlp", "depth": 33},
        {"kind": "mlp", "emb_dim": 2},
        {"kind": "mlp", "dropout": 1.0},
        {"kind": "mlp", "dropout": -0.1},
        {"kind": "unet", "channels": []},
        {"kind": "unet", "channels": [32, 2]},
    ],
)
def test_spec_rejects_bad_fields(fields: dict) -> None:
    with pytest.raises(ValidationError):
        NetSpec(**fields)


def test_spec_defaults_build() -> None:
    spec = NetSpec(kind="resmlp")
    assert (spec.width, spec.depth, spec.channels, spec.emb_dim, spec.dropout) == (256, 3, [32, 64], 64, 0.0)
    assert math.prod(build_net(spec, (2,), 8)(*_inputs((2,), 8)).shape) == 16 * 2


def test_unet2d_is_ddpm_style_with_attention_at_16() -> None:
    """Several residual blocks per level, self-attention only on the 16x16 level, the label in the embedding."""
    spec = NetSpec(kind="unet2d", channels=[32, 64, 64], depth=2, emb_dim=128, dropout=0.1)
    torch.manual_seed(0)
    net = build_net(spec, (3, 32, 32), 10)
    blocks = [type(block).__name__ for block in net.unet.down_blocks]
    assert blocks == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert all(len(block.resnets) == 2 for block in net.unet.down_blocks)
    assert net.unet.class_embedding.num_embeddings == 10 and net.unet.config.dropout == 0.1
    x, t, label = _inputs((3, 32, 32), 10, batch=2)
    with torch.no_grad():
        v = net(x, t, label)
        assert not torch.allclose(v, net(x, t, (label + 1) % 10))
        assert not torch.allclose(v, net(x, 1 - t, label))
    assert count_macs(net, (3, 32, 32), 10) > count_params(net)  # convs run at every pixel


def test_unet2d_refuses_images_it_cannot_halve() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        build_net(NetSpec(kind="unet2d", channels=[16, 32, 32]), (1, 10, 10), 10)
