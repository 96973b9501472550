"""The baseline of benchmark 3: the teacher's net, data and steps in a bare PyTorch loop (no DVC, MLflow, EMA,
clipping, schedule, checkpoints or progress bar). Run as a subprocess so its wall time counts Python and torch
start-up, like the stage's does:

    python -m benchmarks.bare_teacher '{"data": "PROJECT/data", "net": {...}, "steps": 300, ...}'

prints one JSON line: `loop_s`, the rate over the same window the stage's MLflow log covers (`window_steps_per_s`:
from step `log_every` to the last step), and `marks` [(step, seconds since the loop started)].
"""

from __future__ import annotations

import json
import sys
import time


def main(spec: dict) -> dict:
    import numpy as np
    import torch

    from pipeline.nets import NetSpec, build_net

    torch.set_num_threads(spec["threads"])
    with np.load(f"{spec['data']}/train.npz", allow_pickle=False) as arrays:
        x_all, y_all = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["labels"])
    torch.manual_seed(spec["seed"])
    net = build_net(NetSpec.model_validate(spec["net"]), tuple(x_all.shape[1:]), int(spec["num_classes"]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=spec["lr"])
    generator = torch.Generator().manual_seed(spec["seed"])
    batch, every, marks = spec["batch_size"], spec["log_every"], []
    start = time.perf_counter()
    for step in range(spec["steps"]):
        index = torch.randint(len(y_all), (batch,), generator=generator)
        x, label = x_all[index], y_all[index]
        z, t = torch.randn_like(x), torch.rand(batch)
        tt = t.view(-1, *([1] * (x.dim() - 1)))
        loss = (net(tt * x + (1 - tt) * z, t, label) - (x - z)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % every == 0 or step + 1 == spec["steps"]:
            marks.append((step + 1, time.perf_counter() - start))
    loop = time.perf_counter() - start
    first = next(m for m in marks if m[0] >= every)
    rate = (marks[-1][0] - first[0]) / (marks[-1][1] - first[1]) if marks[-1][0] > first[0] else spec["steps"] / loop
    return {"loop_s": loop, "window_steps_per_s": rate, "marks": marks, "final_loss": loss.item()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
