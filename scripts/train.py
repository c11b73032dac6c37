"""Train or fine-tune: a config file, dotted overrides of any of its fields, a workdir.

    python scripts/train.py                     # tiny model, built-in corpus, CPU, a few minutes
    python scripts/train.py --config=configs/small.py --workdir=runs/small \
        --config.data.sources=/data/*.jsonl --config.data.tokenizer=/data/tokenizer.json
    python scripts/train.py --config.num_steps=50 --config.optimizer.learning_rate=1e-3

Overrides are ``--config.<dotted.field>=<value>``; an unknown field is an error naming it. Re-running the same
command resumes from the workdir's latest checkpoint. Multi-process: ``--coordinator_address=host:port
--num_processes=N --process_id=i`` (or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
environment variables, or ``--distributed_auto`` on a cluster JAX detects).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging

from minimax_jax.train.config import apply_overrides, load_config_file
from minimax_jax.train.distributed import initialize_distributed
from minimax_jax.train.profiling import per_op_gpu_events

# XLA's GPU allocator stops at 75% of the memory by default; the small preset on an 80 GB H100 needs more (an
# explicit setting wins). Read when the backend starts (the first use of a device), not at import.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERRIDE_PREFIX = "--config."

_CONFIG = flags.DEFINE_string("config", str(REPO_ROOT / "configs" / "tiny.py"), "run config file (get_config())")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics and TensorBoard events (default: runs/<config>)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
_AUTO = flags.DEFINE_bool("distributed_auto", False, "jax.distributed.initialize() with cluster auto-detection")

_overrides: dict[str, str] = {}


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates ``--config.a.b=value`` arguments (returned as ``{"a.b": "value"}``) from the absl flags."""
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith(OVERRIDE_PREFIX):
            key, sep, value = arg[len(OVERRIDE_PREFIX):].partition("=")
            if not sep:
                raise app.UsageError(f"override {arg!r} needs a value: {OVERRIDE_PREFIX}{key}=VALUE")
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


def _parse_flags(argv: list[str]) -> list[str]:
    rest, overrides = split_overrides(argv)
    _overrides.update(overrides)
    return flags.FLAGS(rest)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    config_path = Path(_CONFIG.value)
    config = apply_overrides(load_config_file(config_path), _overrides)  # fails before any device work
    if config.profile_steps:
        per_op_gpu_events()
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto_detect=_AUTO.value)
    from minimax_jax.train.trainer import train  # after distributed init: importing it must not touch devices

    train(config, _WORKDIR.value or REPO_ROOT / "runs" / config_path.stem)


if __name__ == "__main__":
    app.run(main, argv=sys.argv, flags_parser=_parse_flags)
