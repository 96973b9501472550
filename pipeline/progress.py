"""Progress a person can watch: a tqdm bar on a terminal, plain log lines everywhere else.

A stage run by DVC under Prefect (or piped into `tee`) has no terminal, so a bar would be invisible and
the task log empty. There the same counter prints one line every `every` units and at the end —
`teacher: step 100/300 (33%) loss 0.0421 lr 1.0e-03 · 41.2 steps/s · ETA 5s` — flushed to stderr, which
DVC passes through and the flow forwards line by line to Prefect's task log and `scratch/logs/`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: short enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _value(value: float) -> str:
    return f"{value:.1e}" if value and abs(value) < 1e-2 else f"{value:.4g}"


class Progress:
    """Counts `unit`s towards `total`; a bar on a TTY, else a line per `every` units (and one at the end)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "step",
        initial: int = 0,
        every: int = 100,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit, self.done, self.every = total, desc, unit, initial, max(1, every)
        self.stream = stream or sys.stderr
        self.terminal = enabled and self.stream.isatty()
        self.lines = enabled and not self.terminal
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not self.terminal)
        self._start, self._start_count, self._last_line = time.perf_counter(), initial, initial
        self.fields: dict[str, float] = {}

    def update(self, n: int = 1, **fields: float) -> None:
        """Advance by `n`; `fields` (loss=…, lr=…) are shown on the bar and in the following lines."""
        self.done += n
        self._bar.update(n)
        if fields:
            self.fields.update(fields)
            self._bar.set_postfix({k: _value(v) for k, v in fields.items()}, refresh=False)
        if self.lines and (self.done // self.every > self._last_line // self.every or self.done >= self.total):
            self._last_line = self.done
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = (self.done - self._start_count) / elapsed if elapsed > 0 else 0.0
        counts = f"{self.done}/{self.total}"
        counter = f"step {counts}" if self.unit == "step" else f"{counts} {self.unit}s"
        parts = [f"{self.desc}: {counter} ({100 * self.done / max(1, self.total):.0f}%)"]
        parts += [f"{k} {_value(v)}" for k, v in self.fields.items()]
        text = " ".join(parts) + f" · {rate:.3g} {self.unit}s/s"
        if self.done < self.total and rate > 0:
            text += f" · ETA {duration((self.total - self.done) / rate)}"
        elif self.done >= self.total:
            text += f" · done in {duration(elapsed)}"
        return text

    def close(self) -> None:
        self._bar.close()
