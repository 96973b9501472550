"""FID and KID in the features of a user's local Inception TorchScript file (docs/methods.md §7).

The network is the one StyleGAN2-ADA, EDM and clean-fid use (`inception-2015-12-05.pt`), called as
`net(images, return_features=True) -> (N, 2048)` on uint8 NCHW RGB images; it resizes to 299×299 itself.
Images in [-1, 1] become uint8 as round((x + 1) · 127.5) after clamping; grayscale is repeated to RGB.
Nothing is downloaded: the file is the user's, and its sha256 goes into the recorded protocol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.metrics import frechet_distance_from_stats, gaussian_stats, kernel_inception_distance

CONVERSION = "clamp [-1, 1] -> round((x + 1) * 127.5) uint8, NCHW RGB (grayscale repeated), resize by the network"


class FidError(ValueError):
    """FID settings that cannot work; the message is one line naming the file or key."""


def to_uint8_rgb(x: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1], C in {1, 3} -> (N, 3, H, W) uint8."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise FidError(f"eval.fid needs images (N, 1 or 3, H, W), got data of shape {tuple(x.shape[1:])}")
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class FidScorer:
    """The Inception net, the reference statistics (and features, for KID) and the protocol they define."""

    net: torch.jit.ScriptModule
    mu: np.ndarray
    sigma: np.ndarray
    reference_feats: Tensor | None  # None for an .npz reference (mu, sigma only): no KID
    protocol: dict[str, Any]
    batch_size: int = 250

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, D) float64 on the CPU."""
        device = next(iter(self.net.parameters()), torch.empty(0)).device
        chunks = [self.net(to_uint8_rgb(chunk).to(device), return_features=True) for chunk in x.split(self.batch_size)]
        return torch.cat([c.detach().to(torch.float64).cpu() for c in chunks])

    def score(self, x: Tensor) -> dict[str, float]:
        """{"fid", "kid"} of images x against the reference (kid NaN without reference features)."""
        feats = self.features(x)
        fid = frechet_distance_from_stats(*gaussian_stats(feats), self.mu, self.sigma)
        kid = float("nan") if self.reference_feats is None else kernel_inception_distance(self.reference_feats, feats)
        return {"fid": fid, "kid": kid}


def load_inception(path: Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    if not path.is_file():
        raise FidError(f"eval.fid.inception = {path}: no such file (a TorchScript Inception, e.g. "
                       "inception-2015-12-05.pt; nothing is downloaded)")  # fmt: skip
    try:
        net = torch.jit.load(str(path), map_location=device)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FidError(f"eval.fid.inception = {path}: not a TorchScript file ({first})") from None
    return net.eval()


def _reference_stats(reference: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    path = Path(reference)
    if not path.is_file():
        raise FidError(f"eval.fid.reference = {reference}: no such file (an .npz with mu and sigma, or 'train')")
    with np.load(path, allow_pickle=False) as arrays:
        if not {"mu", "sigma"} <= set(arrays.files):
            raise FidError(f"eval.fid.reference = {reference}: needs arrays mu and sigma (has {arrays.files})")
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise FidError(f"eval.fid.reference = {reference}: mu {mu.shape} / sigma {sigma.shape} do not match the "
                       f"network's {dim} features")  # fmt: skip
    return mu, sigma


def make_scorer(
    inception: str, reference: str, n_samples: int, train_x: Tensor, device: torch.device | str = "cpu"
) -> FidScorer:
    """Load the net, check it on the train images, and build the reference from them or from `reference`."""
    path = Path(inception)
    net = load_inception(path, device)
    probe = FidScorer(net, np.zeros(1), np.zeros((1, 1)), None, {})
    train_feats = probe.features(train_x[:2])
    if train_feats.dim() != 2:
        raise FidError(f"eval.fid.inception = {path}: returned shape {tuple(train_feats.shape)}, expected (N, D)")
    if reference == "train":
        reference_feats = probe.features(train_x)
        mu, sigma = gaussian_stats(reference_feats)
        described = f"train set ({len(train_x)} images)"
    else:
        reference_feats = None
        mu, sigma = _reference_stats(reference, train_feats.shape[1])
        described = f"{reference} (sha256 {sha256_of(Path(reference))})"
    protocol = {
        "inception": str(path), "inception_sha256": sha256_of(path), "reference": described,
        "n_samples": n_samples, "features": int(train_feats.shape[1]), "conversion": CONVERSION,
        "kid": "poly kernel (x.y/D + 1)^3, 100 subsets of min(1000, N)" if reference_feats is not None
        else "off (an .npz reference has no features)",
    }  # fmt: skip
    return FidScorer(net, mu, sigma, reference_feats, protocol)
