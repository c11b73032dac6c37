"""This process's batches, independent of the process layout, and their assembly into global arrays.

The global batch is made of ``data_shards`` equal parts, part ``s`` coming from the pipeline's document shard
``s`` of ``data_shards`` (``make_dataset(process_index=s, process_count=data_shards)``). Process ``p`` of ``P``
reads parts ``p * data_shards / P ...`` and concatenates them, so 1 process x 8 devices and 2 processes x 4
devices train on the same global batches when ``data_shards`` is fixed (default: the process count).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from minimax_jax.data.pipeline import DataConfig, make_dataset
from minimax_jax.data.tokenizer import Tokenizer


class ShardedBatches:
    """Iterator over this process's rows of each global batch (numpy dicts), checkpointable by grain's handler.

    ``get_state`` / ``set_state`` use bytes (JSON of every shard's grain state), the form that
    ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` expect of a non-grain iterator.
    """

    def __init__(self, config: DataConfig, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                 data_shards: int, process_index: int, process_count: int):
        if data_shards % process_count:
            raise ValueError(f"data_shards ({data_shards}) must be a multiple of the process count ({process_count})")
        per_process = data_shards // process_count
        shards = range(process_index * per_process, (process_index + 1) * per_process)
        self._iterators = [
            iter(make_dataset(config, tokenizer, seq_len=seq_len, global_batch_size=global_batch_size,
                              process_index=s, process_count=data_shards)) for s in shards
        ]

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iterators]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({"shards": [it.get_state() for it in self._iterators]}).encode()

    def set_state(self, state: bytes) -> None:
        shards = json.loads(state)["shards"]
        if len(shards) != len(self._iterators):
            raise ValueError(f"data state has {len(shards)} shards, this process reads {len(self._iterators)}")
        for it, shard_state in zip(self._iterators, shards, strict=True):
            it.set_state(shard_state)

    def start_prefetch(self) -> None:
        """Called by grain's restore handler; the shard iterators prefetch on their own."""


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding,
                 global_batch_size: int) -> dict[str, jax.Array]:
    """Global ``[global_batch_size, ...]`` arrays from every process's local rows (process order = row order)."""
    return {key: jax.make_array_from_process_local_data(sharding, value, (global_batch_size, *value.shape[1:]))
            for key, value in local.items()}
