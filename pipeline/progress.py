"""A small progress printer (rate, ETA) and a plain-text table, shared by the prepare and training jobs.

One line at most every ``every`` seconds, so a job's log stays readable on a cluster where stdout is
collected (no carriage-return tricks, which `ray job logs` would show as garbage).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Counts work done and prints ``label: done/total unit  rate unit/s  ETA h:mm:ss`` now and then."""

    def __init__(
        self,
        total: int | None,
        *,
        label: str = "progress",
        unit: str = "items",
        every: float = 5.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.done = 0
        self.start = clock()
        self._last_print = self.start
        self.extra: dict[str, Any] = {}

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def rate(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.total is None or self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate

    def line(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f"  {k} {v}" for k, v in self.extra.items())
        return (
            f"{self.label}: {self.done}{total} {self.unit}  {self.rate:.1f} {self.unit}/s"
            f"  elapsed {format_seconds(self.elapsed)}  ETA {format_seconds(self.eta)}{extra}"
        )

    def update(self, n: int = 1, **extra: Any) -> bool:
        """Add ``n``; print when ``every`` seconds passed since the last line. Returns whether it printed."""
        self.done += n
        self.extra.update(extra)
        now = self.clock()
        if now - self._last_print >= self.every:
            self._last_print = now
            print(self.line(), file=self.stream, flush=True)
            return True
        return False

    def close(self) -> None:
        """Always print the final line."""
        print(self.line(), file=self.stream, flush=True)


def format_table(rows: Sequence[tuple[str, Any]], title: str | None = None) -> str:
    """Two aligned columns; floats with two decimals."""
    cells = [
        (str(k), f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        for k, v in rows
    ]
    width_k = max((len(k) for k, _ in cells), default=0)
    width_v = max((len(v) for _, v in cells), default=0)
    rule = "-" * (width_k + width_v + 3)
    lines = [title, rule] if title else [rule]
    lines += [f"{k:<{width_k}}   {v:>{width_v}}" for k, v in cells]
    lines.append(rule)
    return "\n".join(lines)
