"""The CUDA paths on a real GPU: bf16 autocast, device placement, resume, the stages end to end.

CI has no GPU, so these are skipped there; run them with `pytest -m gpu` on a machine that has one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from pipeline.config import TrainSection
from pipeline.data import Dataset, RandomBatches
from pipeline.flow import EPS, RectifiedFlowLoss, sample
from pipeline.modelio import load_model
from pipeline.nets import NetSpec, build_net
from pipeline.profiles import render
from pipeline.training import train
from tests.conftest import make_project, stage_commands
from tests.test_flow import gaussian_map, gaussian_velocity

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
SPEC = NetSpec(kind="resmlp", width=64, depth=2, emb_dim=16)


@pytest.fixture(scope="module")
def ring() -> Dataset:
    """Eight Gaussian blobs on a circle: a flow worth learning in a few hundred steps."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, size=4096)
    angles = 2 * np.pi * labels / 8
    x = np.stack([np.cos(angles), np.sin(angles)], 1) * 0.8 + 0.05 * rng.standard_normal((4096, 2))
    return Dataset(x.astype(np.float32), labels.astype(np.int64), 8)


def settings(**overrides: object) -> TrainSection:
    base = dict(steps=300, batch_size=256, lr=2e-3, seed=0, checkpoint_every=50, log_every=50, warmup_steps=10,
                lr_schedule="cosine", ema_decay=0.99, amp=True)  # fmt: skip
    return TrainSection(**(base | overrides))


def fresh_net(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_net(SPEC, (2,), 8).to(device)


def test_amp_runs_matmuls_in_bf16_keeps_fp32_weights_and_learns(ring: Dataset, tmp_path: Path) -> None:
    net = fresh_net(CUDA)
    seen: set[torch.dtype] = set()
    first_linear = next(m for m in net.modules() if isinstance(m, nn.Linear))
    first_linear.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    checkpoint = tmp_path / "checkpoint.pt"
    result = train(net, RectifiedFlowLoss(), RandomBatches(ring, 256, 0, CUDA), settings(), checkpoint=checkpoint,
                   progress=False)  # fmt: skip
    assert torch.bfloat16 in seen  # autocast really engaged
    assert all(p.dtype == torch.float32 and p.is_cuda for p in result.net.parameters())
    assert all(p.dtype == torch.float32 and p.is_cuda for p in result.ema.parameters())
    assert np.mean(result.losses[-50:]) < 0.7 * np.mean(result.losses[:50])

    # The checkpoint loads on a CPU-only process and gives the same network.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    on_cpu = build_net(SPEC, (2,), 8)
    on_cpu.load_state_dict(state["net"])
    x, t, label = torch.randn(64, 2), torch.rand(64), torch.randint(0, 8, (64,))
    with torch.no_grad():
        expected = result.net(x.to(CUDA), t.to(CUDA), label.to(CUDA)).cpu()
        assert torch.allclose(on_cpu(x, t, label), expected, atol=1e-4)


def test_killed_cuda_run_resumes_to_the_same_weights(ring: Dataset, tmp_path: Path) -> None:
    cfg, checkpoint = settings(steps=120), tmp_path / "checkpoint.pt"
    full = train(fresh_net(CUDA), RectifiedFlowLoss(), RandomBatches(ring, 256, 0, CUDA), cfg, progress=False)
    train(fresh_net(CUDA), RectifiedFlowLoss(), RandomBatches(ring, 256, 0, CUDA), cfg, checkpoint=checkpoint,
          stop_after=60, progress=False)  # fmt: skip
    resumed = train(fresh_net(CUDA), RectifiedFlowLoss(), RandomBatches(ring, 256, 0, CUDA), cfg,
                    checkpoint=checkpoint, progress=False)  # fmt: skip
    assert resumed.resumed_from == 60
    for key, value in full.net.state_dict().items():
        assert torch.allclose(resumed.net.state_dict()[key], value, atol=1e-6, rtol=1e-5), key
    assert np.allclose(resumed.losses, full.losses, atol=1e-5)


@pytest.mark.parametrize("sampler", ["onestep", "euler-8", "heun-4", "dopri5-1e-05"])
def test_samplers_on_cuda_match_the_cpu_on_the_exact_gaussian_flow(sampler: str) -> None:
    """A smooth, known flow: an adaptive solve is well conditioned, so CPU and GPU must agree closely."""
    mu, s = torch.tensor([0.5, -1.0]), 0.3
    z, label = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)), torch.zeros(256, dtype=torch.long)
    cpu = sample(gaussian_velocity(mu, s), z, label, sampler)
    gpu = sample(gaussian_velocity(mu.to(CUDA), s), z.to(CUDA), label.to(CUDA), sampler)
    assert gpu.x.is_cuda
    assert abs(gpu.nfe - cpu.nfe) <= (6 if sampler.startswith("dopri5") else 0)
    # Adaptive steps follow rounding (the error norm sums in another order on the GPU); fixed steps do not.
    assert torch.allclose(gpu.x.cpu(), cpu.x, atol=1e-3 if sampler.startswith("dopri5") else 1e-5)
    if sampler.startswith("dopri5"):
        assert torch.allclose(gpu.x.cpu(), gaussian_map(z, mu, s, EPS, 1.0), atol=1e-3)


@pytest.mark.slow
def test_smoke_stages_run_on_cuda(tmp_path: Path) -> None:
    """Every stage of the smoke chain with `device: cuda`, in DAG order (no `dvc repro`, tracking off)."""
    tmp_path = make_project(tmp_path / "repo")
    params = render("smoke", ROOT / "configs") | {"device": "cuda"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    commands = stage_commands(tmp_path)
    env = {**os.environ, "SLIMSTEP_TRACKING": "off"}
    for name, *args in commands:
        done = subprocess.run([sys.executable, "-m", "stages", name, *args], cwd=tmp_path, capture_output=True,
                              text=True, env=env)  # fmt: skip
        assert done.returncode == 0, f"stage {name} {args}:\n{done.stderr[-3000:]}"

    board = pd.read_csv(tmp_path / "reports" / "leaderboard.csv")
    assert {
        "teacher",
        "anneal@slimflow",
        "anneal@reflow",
        "distill@fgd",
        "distill@naive-paper",
        "distill@naive",
        "msd@ensemble",
    } <= set(board["model"])
    assert board["fd"].notna().all()
    # Weights written on the GPU load on the CPU.
    student = load_model(tmp_path / "models" / "distill@fgd")
    assert all(not p.is_cuda for p in student.net.parameters())
