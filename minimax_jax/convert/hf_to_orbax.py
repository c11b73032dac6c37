"""Official / transformers safetensors -> an orbax checkpoint in the trainer's layout, streaming.

Each stacked parameter is written one official tensor at a time (read with ``pread``, re-laid out, cast, written
as its own storage chunks), so peak host memory is about one tensor plus the runtime, never the model. Before
anything is written the source is checked against the config: every tensor present, none unexpected, right shapes,
floating dtypes; the errors name the tensors. transformers' derived lightning buffers are skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import TextIO

import numpy as np
from jax.sharding import AbstractMesh

from minimax_jax.checkpoint import CheckpointError, check_checkpoint_names, derived_buffer_names, official_to_param
from minimax_jax.config import ModelConfig
from minimax_jax.convert.layout import PARAMS_ITEM, write_config
from minimax_jax.convert.orbax_stream import Block, StreamedArray, save_streamed
from minimax_jax.convert.plan import ParamPlan, conversion_plan
from minimax_jax.convert.progress import Progress
from minimax_jax.convert.safetensors_format import FLOAT_DTYPES, TensorEntry, read_folder_index, read_tensor


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What a conversion did: tensors converted, bytes read and written (logical, uncompressed), time."""

    output: str
    tensors: int
    bytes_read: int
    bytes_written: int
    skipped: tuple[str, ...]
    seconds: float

    def summary(self) -> str:
        return (f"converted {self.tensors} tensors: {self.bytes_read / 1e9:.3f} GB read, "
                f"{self.bytes_written / 1e9:.3f} GB written in {self.seconds:.1f} s -> {self.output}"
                + (f" ({len(self.skipped)} derived buffers skipped)" if self.skipped else ""))


def validate_source(config: ModelConfig, entries: dict[str, TensorEntry]) -> None:
    """Raises ``CheckpointError`` naming every missing, unexpected, mis-shaped or non-floating tensor."""
    check_checkpoint_names(config, {name: e.shape for name, e in entries.items()})
    ignored = derived_buffer_names(config)
    not_float = sorted(f"{name}: {e.dtype}" for name, e in entries.items()
                       if name not in ignored and e.dtype not in FLOAT_DTYPES)
    if not_float:
        raise CheckpointError(f"{len(not_float)} tensor(s) with a non-floating dtype:\n  " + "\n  ".join(not_float))


def _blocks(plan: ParamPlan, entries: dict[str, TensorEntry], consumed: collections.Counter, progress: Progress
            ) -> Iterator[Block]:
    for m in plan.mappings:
        if consumed[m.name]:
            raise CheckpointError(f"{m.name}: read twice (it maps to {'.'.join(plan.key)} more than once)")
        entry = entries[m.name]
        try:
            array = read_tensor(entry)
        except ValueError as e:
            raise CheckpointError(f"{m.name}: {e}") from e
        consumed[m.name] += 1
        block = official_to_param(m, array, plan.block_shape(m)).astype(plan.dtype, copy=False)
        index = tuple(slice(i, i + 1) for i in m.index) + (slice(None),) * len(plan.block_shape(m))
        yield index, block.reshape((1,) * len(m.index) + block.shape)
        progress.update(1, entry.nbytes)


def _remove_partial(step_dir: str) -> None:
    for leftover in glob.glob(glob.escape(step_dir) + ".orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)


def convert_hf_to_orbax(source: str, output: str, *, dtype: np.dtype | str = "bfloat16",
                        mesh: AbstractMesh | None = None, step: int = 0, overwrite: bool = False, compress: bool = True,
                        progress_stream: TextIO | None = sys.stderr) -> ConversionReport:
    """Converts the checkpoint folder ``source`` into ``<output>/<step>/params`` + ``<output>/config.json``.

    ``dtype`` is the stored dtype; ``mesh`` the target mesh (storage chunks never straddle its shards);
    ``compress``: zstd-compress the chunks (orbax's default; off is faster, bigger). orbax
    writes into a temporary folder renamed to ``<step>`` at the end: a failed conversion leaves no step folder.
    """
    start = time.perf_counter()
    config = ModelConfig.from_json(source)
    entries = read_folder_index(source)
    validate_source(config, entries)
    plans = conversion_plan(config, dtype, mesh)
    step_dir = os.path.join(os.path.abspath(output), str(step))
    if os.path.exists(step_dir):
        if not overwrite:
            raise FileExistsError(f"{step_dir} exists (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(step_dir)
    os.makedirs(output, exist_ok=True)

    expected = [m.name for p in plans for m in p.mappings]
    progress = Progress(len(expected), sum(entries[n].nbytes for n in expected), "hf -> orbax", progress_stream)
    consumed: collections.Counter = collections.Counter()
    tree: dict = {}
    for plan in plans:
        node = tree
        for key in plan.key[:-1]:
            node = node.setdefault(key, {})
        node[plan.key[-1]] = StreamedArray(plan.shape, plan.dtype, plan.chunk_shape,
                                           functools.partial(_blocks, plan, entries, consumed, progress))
    try:
        save_streamed(step_dir, PARAMS_ITEM, tree, compress=compress)
    except BaseException:
        _remove_partial(step_dir)
        raise
    progress.close()
    if sorted(consumed.elements()) != sorted(expected):
        shutil.rmtree(step_dir, ignore_errors=True)
        raise CheckpointError("not every source tensor was converted exactly once: "
                              f"{sorted(set(expected) ^ set(consumed.elements()))[:10]}")
    write_config(output, config)
    skipped = tuple(sorted(set(entries) & derived_buffer_names(config)))
    return ConversionReport(step_dir, len(expected), progress.bytes, sum(p.nbytes for p in plans), skipped,
                            time.perf_counter() - start)
