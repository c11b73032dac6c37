"""Convert an orbax params checkpoint (converted or trained) into sharded official-name safetensors.

Writes ``model-0000i-of-0000n.safetensors``, ``model.safetensors.index.json`` and a config.json with the official
keys plus transformers' ``MiniMaxConfig`` keys (same values), loadable by ``minimax_jax.from_pretrained`` and by
transformers' ``AutoModelForCausalLM.from_pretrained`` (tests/golden/transformers_export/). transformers 5.23 ignores
rotary_dim (full-head RoPE): its logits match only for rotary_dim == head_dim. Streaming: one tensor in host memory
at a time.

    python scripts/convert_orbax_to_hf.py --source=/ckpt/orbax --output=/ckpt/hf
    python scripts/convert_orbax_to_hf.py --source=/run/checkpoints --step=1000 --config=small --output=/ckpt/hf
"""

from __future__ import annotations

import os

from absl import app, flags

from minimax_jax.convert.cli import dry_run_text, resolve_config
from minimax_jax.convert.layout import CONFIG_FILE, params_dir
from minimax_jax.convert.orbax_to_hf import convert_orbax_to_hf

_SOURCE = flags.DEFINE_string("source", None, "checkpoint root (latest or --step), a step folder or a params item")
_OUTPUT = flags.DEFINE_string("output", None, "folder to create")
_STEP = flags.DEFINE_integer("step", None, "step to export (default: the latest)")
_CONFIG = flags.DEFINE_string("config", None, "preset name or config.json (default: <source>/config.json)")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32", "float16"], "output dtype (default: stored)")
_SHARD_GB = flags.DEFINE_float("max_shard_size_gb", 5.0, "largest safetensors file, in GB")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing --output")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the mapping; read no tensor data")


def main(argv: list[str]) -> None:
    del argv
    if not _SOURCE.value and not _DRY_RUN.value:
        raise app.UsageError("--source is required")
    fallback = None
    if _SOURCE.value and os.path.exists(os.path.join(_SOURCE.value, CONFIG_FILE)):
        fallback = _SOURCE.value
    config = resolve_config(_CONFIG.value, fallback)
    if _DRY_RUN.value:
        print(dry_run_text(config, _DTYPE.value or "bfloat16", None))
        return
    if not _OUTPUT.value:
        raise app.UsageError("--output is required")
    report = convert_orbax_to_hf(params_dir(_SOURCE.value, _STEP.value), _OUTPUT.value, config, dtype=_DTYPE.value,
                                 max_shard_bytes=int(_SHARD_GB.value * 1e9), overwrite=_OVERWRITE.value)
    print(report.summary())


if __name__ == "__main__":
    app.run(main)
