"""Peak resident memory of one workload, measured in a fresh subprocess (RSS high-water is per process).

    python -m benchmarks.memprobe '{"target": "alloc", "mb": 50}'

prints one JSON line: `baseline_kb` (resident size after imports), `peak_kb` (the high-water mark at the end:
VmHWM on Linux, see `_peak_rss_kb`; `ru_maxrss_kb` too), `growth_kb` = peak - baseline, and what the target
reports. Targets: `alloc` / `stream_alloc` (plain bytearrays held at once / one at a time: the probe's own check,
no torch) and `train` (a tiny net trained on a pair store through the streaming PairStream or, the negative
control, an all-in-RAM loader).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _maxrss_kb() -> int:
    # Linux reports kilobytes, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _current_rss_kb() -> int:
    """Resident size now. The baseline must be the current size: an import-time high-water mark above it would
    hide the workload's first allocations."""
    return _status_kb("VmRSS") or _maxrss_kb()


def _peak_rss_kb() -> int:
    """This process's RSS high-water mark. On Linux ru_maxrss(RUSAGE_SELF) starts at the *parent's* RSS (exec
    records the forked copy's high-water mark into the process's maxrss), so a probe started from a runner holding
    500 MB would read >= 500 MB whatever it does; VmHWM belongs to the process's own address space."""
    return _status_kb("VmHWM") or _maxrss_kb()


def probe(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run `spec` in a new Python process; its JSON report with `baseline_kb`, `peak_kb`, `growth_kb`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memprobe", json.dumps(spec)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {spec} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# Targets (run inside the probe process).


def _touched(mb: int) -> bytearray:
    return bytearray(os.urandom(1024)) * (mb * 1024)


def _alloc(mb: int, chunk_mb: int = 8) -> dict[str, Any]:
    """Hold `mb` MB at once, like an all-in-RAM loader: peak grows with mb."""
    held = [_touched(chunk_mb) for _ in range(max(1, mb // chunk_mb))]
    return {"held_mb": sum(len(b) for b in held) / 2**20}


def _stream_alloc(mb: int, chunk_mb: int = 8) -> dict[str, Any]:
    """Touch `mb` MB one chunk at a time, dropping each, like a streaming loader: peak stays at about one chunk."""
    total = 0
    for _ in range(max(1, mb // chunk_mb)):
        chunk = _touched(chunk_mb)
        total += len(chunk)
        del chunk
    return {"seen_mb": total / 2**20}


class InRamPairs:
    """The negative control: every shard loaded and concatenated (what the official code does), random batches."""

    def __init__(self, root: Path, batch_size: int, seed: int) -> None:
        import torch

        from pipeline.pairs import load_metadata

        files = [root / entry["file"] for entry in load_metadata(root)["shards"]]
        shards = [torch.load(f, weights_only=True) for f in files]
        self.x = torch.cat([s["x"] for s in shards]).float()
        self.z = torch.cat([s["z"] for s in shards])
        self.label = torch.cat([s["label"] for s in shards])
        del shards
        self.batch_size, self.generator = batch_size, torch.Generator().manual_seed(seed)

    def __iter__(self) -> InRamPairs:
        return self

    def __next__(self):  # noqa: ANN204 - a Batch
        import torch

        from pipeline.flow import Batch

        index = torch.randint(len(self.label), (self.batch_size,), generator=self.generator)
        return Batch(x=self.x[index], label=self.label[index], z=self.z[index])


def _train(store: str, loader: str, batch_size: int = 256, width: int = 64, threads: int = 1) -> dict[str, Any]:
    """Train a tiny MLP on the pair store for one pass over it (steps = pairs / batch) with plain reflow."""
    import torch

    from pipeline.config import TrainSection
    from pipeline.flow import RectifiedFlowLoss
    from pipeline.nets import NetSpec, build_net
    from pipeline.pairs import PairStream, load_metadata
    from pipeline.training import train

    torch.set_num_threads(threads)
    root = Path(store)
    meta = load_metadata(root)
    batches = PairStream(root, batch_size, seed=0) if loader == "stream" else InRamPairs(root, batch_size, 0)
    steps = max(1, -(-meta["n_pairs"] // batch_size))
    torch.manual_seed(0)
    net = build_net(NetSpec(kind="mlp", width=width, depth=1, emb_dim=16), tuple(meta["data_shape"]), 10)
    settings = TrainSection(steps=steps, batch_size=batch_size, lr=1e-3, seed=0, checkpoint_every=10**9,
                            log_every=max(1, steps // 4))  # fmt: skip
    result = train(net, RectifiedFlowLoss(), iter(batches), settings, progress=False)
    return {"steps": steps, "n_pairs": meta["n_pairs"], "loader": loader, "final_loss": result.losses[-1]}


TARGETS = {"alloc": _alloc, "stream_alloc": _stream_alloc, "train": _train}


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    target = TARGETS[spec.pop("target")]
    if target is _train:
        import torch  # noqa: F401 - the imports belong to the baseline, not to the workload

        import pipeline.training  # noqa: F401
    baseline = _current_rss_kb()
    report = target(**spec)
    peak = _peak_rss_kb()
    print(json.dumps({**report, "baseline_kb": baseline, "peak_kb": peak, "growth_kb": peak - baseline,
                      "ru_maxrss_kb": _maxrss_kb()}))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
