"""Convert MiniMax-Text-01 safetensors (official or transformers config.json) into an orbax checkpoint.

The output is a CheckpointManager directory, ``<output>/<step>/params`` (the trainer's params layout, stacked layer
groups and experts, storage chunks aligned with the target mesh's shards) plus ``<output>/config.json``. Streaming:
peak host memory is about one tensor. Examples:

    python scripts/convert_hf_to_orbax.py --source=/ckpt/MiniMax-Text-01 --output=/ckpt/orbax --mesh=fsdp=8,expert=8
    python scripts/convert_hf_to_orbax.py --config=minimax_text_01 --mesh=fsdp=8,expert=8 --dry_run
"""

from __future__ import annotations

import os

from absl import app, flags

from minimax_jax.convert.cli import dry_run_text, resolve_config
from minimax_jax.convert.hf_to_orbax import convert_hf_to_orbax, validate_source
from minimax_jax.convert.plan import parse_mesh
from minimax_jax.convert.safetensors_format import read_folder_index

_SOURCE = flags.DEFINE_string("source", None, "folder with config.json and model.safetensors[.index.json]")
_OUTPUT = flags.DEFINE_string("output", None, "orbax checkpoint directory to create")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "stored dtype of the params")
_MESH = flags.DEFINE_string("mesh", "", "target mesh axes, e.g. 'fsdp=8,expert=4' (empty: single device)")
_STEP = flags.DEFINE_integer("step", 0, "step number of the written checkpoint")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing <output>/<step>")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the mapping and target shardings; read no tensor data")
_CONFIG = flags.DEFINE_string("config", None, "for --dry_run without --source: a preset name or config.json path")


def main(argv: list[str]) -> None:
    del argv
    mesh = parse_mesh(_MESH.value)
    if _DRY_RUN.value:
        config = resolve_config(_CONFIG.value, _SOURCE.value)
        print(dry_run_text(config, _DTYPE.value, mesh))
        if _SOURCE.value and os.path.exists(_SOURCE.value):
            validate_source(config, read_folder_index(_SOURCE.value))  # headers only
            print(f"# {_SOURCE.value}: every tensor present, none unexpected, shapes and dtypes match the config")
        return
    if not _SOURCE.value or not _OUTPUT.value:
        raise app.UsageError("--source and --output are required (or --dry_run)")
    report = convert_hf_to_orbax(_SOURCE.value, _OUTPUT.value, dtype=_DTYPE.value, mesh=mesh, step=_STEP.value,
                                 overwrite=_OVERWRITE.value)
    print(report.summary())


if __name__ == "__main__":
    app.run(main)
