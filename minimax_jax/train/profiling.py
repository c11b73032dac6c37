"""Traces a few train steps with the JAX profiler (``TrainConfig.profile_steps``), after warm-up steps so that
compilation and the first transfers stay out of the trace. ``scripts/trace_summary.py`` ranks the traced ops."""

from __future__ import annotations

from pathlib import Path

import jax

WARMUP_STEPS = 3


class StepProfiler:
    """Starts a trace before step ``WARMUP_STEPS`` of this run and stops it ``num_steps`` steps later."""

    def __init__(self, directory: Path, num_steps: int, *, enabled: bool = True):
        self.directory, self.num_steps, self.enabled = directory, num_steps, enabled and num_steps > 0
        self.active = False

    def before_step(self, steps_done: int) -> None:
        if self.enabled and steps_done == WARMUP_STEPS:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_step(self, steps_done: int, outputs) -> None:
        if self.active and steps_done == WARMUP_STEPS + self.num_steps:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
