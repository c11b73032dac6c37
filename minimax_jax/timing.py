"""Wall-clock timing of compiled JAX functions for the benchmark scripts (not for tests)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import jax


def median_ms(fn: Callable, *args, trials: int = 7, min_trial_s: float = 0.05,
              slow_call_s: float = math.inf) -> float:
    """Median milliseconds per call of ``fn(*args)``.

    Two warm-up calls (the first compiles), then ``trials`` trials of back-to-back calls ended by
    ``block_until_ready``, each long enough (``min_trial_s``) that launch jitter averages out. A call slower than
    ``slow_call_s`` gets 2 trials only.
    """
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one_call_s = time.perf_counter() - start
    reps = max(1, int(min_trial_s / max(one_call_s, 1e-6)))
    trials = trials if one_call_s < slow_call_s else 2
    results = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        results.append((time.perf_counter() - start) / reps * 1e3)
    return statistics.median(results)


def report(text: str, out_md: str = "") -> None:
    """Prints a benchmark's markdown and, when ``out_md`` names a file, writes it there too."""
    print(text)
    if out_md:
        with open(out_md, "w") as f:
            f.write(text + "\n")
