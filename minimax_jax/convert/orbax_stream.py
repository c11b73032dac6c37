"""Write an orbax PyTree checkpoint whose arrays are produced block by block, never whole.

orbax saves a pytree by handing every leaf to a ``TypeHandler``; the stock handlers need each array in memory.
``StreamedArray`` is a leaf that only knows its shape, dtype, chunk shape and how to produce its blocks;
``StreamedArrayHandler`` creates the array's tensorstore with orbax's own write spec (same OCDBT/zarr layout,
same per-param naming, recorded as a ``jax.Array``) and writes the blocks one at a time, so the host holds one
block (one official tensor) at a time. The result is read back by ``ocp.args.StandardRestore`` / ``PyTreeRestore``
exactly like a checkpoint of real ``jax.Array``s, onto any target sharding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.serialization import ocdbt_utils, type_handlers
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

Index = tuple[slice, ...]
Block = tuple[Index, np.ndarray]


@dataclasses.dataclass(frozen=True)
class StreamedArray:
    """A leaf to save: ``blocks()`` yields ``(index, array)`` pairs that tile the whole array exactly once.

    ``chunk_shape`` is the storage chunk; every block must cover whole chunks (no read-modify-write, so the host
    holds only the block being written).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    blocks: Callable[[], Iterator[Block]]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class StreamedArrayHandler(type_handlers.NumpyHandler):
    """Saves ``StreamedArray`` leaves in orbax's array format, one block at a time (process 0 writes)."""

    def typestr(self) -> str:
        return "jax.Array"  # what the trainer's checkpoints record, so restores treat both alike

    async def serialize(self, values: Sequence[StreamedArray], infos: Sequence[ocp.type_handlers.ParamInfo],
                        args: Sequence[ocp.SaveArgs] | None = None) -> list[future.Future]:
        args = args or [ocp.SaveArgs()] * len(values)
        return [future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args),
                                                             name="streamed_array_handler")]

    async def _write_all(self, values, infos, args) -> None:
        for value, info, arg in zip(values, infos, args, strict=True):  # one array, one block at a time
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=value.shape, local_shape=value.chunk_shape, dtype=value.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
                metadata_key=self._metadata_key)
            store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            for index, block in value.blocks():
                await store[index].write(np.asarray(block, value.dtype))


def streamed_registry() -> ocp.type_handlers.TypeHandlerRegistry:
    """A type-handler registry that saves ``StreamedArray`` leaves (only those)."""
    return ocp.type_handlers.create_type_handler_registry((StreamedArray, StreamedArrayHandler()))


def save_streamed(directory: str, item_name: str, tree: dict, *, compress: bool = True) -> None:
    """Saves ``tree`` (nested dicts of ``StreamedArray``) as item ``item_name`` of the step folder ``directory``.

    The layout is that of a ``CheckpointManager`` step (``<directory>/<item_name>/`` plus the step metadata); orbax
    writes into a temporary folder and renames it to ``directory`` only once everything is written, so an
    interrupted conversion never leaves a folder that looks complete. ``compress``: zstd chunks (orbax's default).
    """
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_compression=compress,
                                           type_handler_registry=streamed_registry())
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{item_name: handler}))
    checkpointer.save(directory, args=ocp.args.Composite(**{item_name: ocp.args.PyTreeSave(tree)}))
    checkpointer.close()
