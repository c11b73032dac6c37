"""Training metrics: a one-line progress report, JSONL and TensorBoard event files (tensorboardX) in the workdir.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per logged step (scalars, plus ``expert_load``:
each expert's share of the routed token-slots averaged over layers, and ``expert_load_max``: the largest
per-layer share over the balanced share 1/E).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

_log = logging.getLogger(__name__)


def expert_load_metrics(expert_counts: np.ndarray) -> dict[str, Any]:
    """From routed-slot counts ``[layers, experts]``: mean share per expert and the worst layer's max/balanced."""
    counts = np.asarray(expert_counts, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
    num_experts = counts.shape[-1]
    return {"expert_load": [round(float(s), 5) for s in shares.mean(axis=0)],
            "expert_load_max": float(shares.max() * num_experts)}


def progress_line(step: int, num_steps: int, metrics: dict[str, Any], width: int = 20) -> str:
    """``step  120/600 [####----] loss 2.3102 aux 1.012 gnorm 0.53 lr 2.9e-03 tok/s 1.2e+04 MFU 0.1%``."""
    filled = int(width * step / num_steps)
    bar = "#" * filled + "-" * (width - filled)
    line = (f"step {step:>{len(str(num_steps))}}/{num_steps} [{bar}] loss {metrics['loss']:.4f} "
            f"aux {metrics['aux_loss']:.3f} gnorm {metrics['grad_norm']:.3g} lr {metrics['learning_rate']:.2e} "
            f"tok/s {metrics['tokens_per_second']:.3g} MFU {100 * metrics['mfu']:.2f}%")
    if metrics.get("skipped_total"):
        line += f" skipped {metrics['skipped_total']}"
    return line


class MetricsWriter:
    """Appends metrics to ``<workdir>/metrics.jsonl`` and TensorBoard events under ``<workdir>/tensorboard``."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            _log.warning("tensorboardX is not installed: no TensorBoard event files (metrics.jsonl is written)")
        else:
            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float):
                    self._tensorboard.add_scalar(f"train/{name}", value, step)
                elif name == "expert_load":
                    for expert, share in enumerate(value):
                        self._tensorboard.add_scalar(f"expert_load/{expert}", share, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
