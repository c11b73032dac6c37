"""A progress line for long conversions: tensors and bytes done, rate, and a closing report."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TextIO


@dataclasses.dataclass
class Progress:
    """Counts tensors and bytes; redraws one status line on ``stream`` at most every ``interval`` seconds."""

    total_tensors: int
    total_bytes: int
    label: str = "converting"
    stream: TextIO | None = dataclasses.field(default_factory=lambda: sys.stderr)
    interval: float = 0.5
    tensors: int = 0
    bytes: int = 0
    _start: float = dataclasses.field(default_factory=time.perf_counter)
    _last_draw: float = 0.0

    def update(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        now = time.perf_counter()
        if self.stream is not None and (now - self._last_draw >= self.interval or self.tensors == self.total_tensors):
            self._last_draw = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def line(self) -> str:
        frac = self.bytes / self.total_bytes if self.total_bytes else 1.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        rate = self.bytes / max(self.elapsed, 1e-9) / 1e6
        return (f"{self.label} [{bar}] {self.tensors}/{self.total_tensors} tensors, "
                f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, {rate:.0f} MB/s")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
