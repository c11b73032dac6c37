"""The training data pipeline: documents -> process shard -> shuffle/repeat -> tokens -> packed rows -> batches.

Order of operations and why:

1. Documents are read (``sources`` / ``corpus``) in a fixed order that every process shares.
2. Process sharding: process ``i`` of ``n`` keeps documents ``i, i + n, i + 2n, ...`` - disjoint slices whose
   union is the corpus. Sharding happens before shuffling so that each epoch is a permutation of the shard.
3. ``shuffle(seed)`` then ``repeat(num_epochs)``: grain folds the epoch into the seed, so every epoch has a
   different, deterministic order. ``num_epochs=None`` repeats forever (the default: the trainer stops after
   its step count, and no process runs dry before another, which would stall a multi-host step).
4. Tokenize (``document_token_ids``) and pack into rows of ``seq_len`` (``packing``).
5. Batch ``global_batch_size // process_count`` rows per process. A finite stream's last batch is padded with
   all-padding rows (``loss_mask`` 0) rather than dropped.

Resuming: ``it = iter(dataset)``; ``state = it.get_state()`` is a JSON-able dict; a fresh
``iter(dataset)`` given ``set_state(state)`` yields exactly the batches that followed. Use ``state_to_json`` /
``state_from_json``, or orbax: grain iterators work with ``grain.checkpoint.CheckpointSave(it)`` /
``CheckpointRestore(it)`` (orbax v0 args, JSON per process) and are orbax v1 ``StatefulCheckpointable``.
The state is only valid for the same ``DataConfig``, tokenizer, ``seq_len``, batch size and process layout.
Hold the iterator in a function scope (or ``del`` it) rather than a module global: grain 0.2.18's prefetch
iterators print an ignored ``AttributeError`` when still alive at interpreter shutdown.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import grain

from minimax_jax.data.corpus import builtin_corpus_documents
from minimax_jax.data.packing import PackedIterDataset
from minimax_jax.data.sources import read_documents
from minimax_jax.data.tokenizer import BYTE_TOKENIZER_SPEC, Tokenizer, document_token_ids


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is ordered.

    sources: paths or globs of ``.txt``-like, ``.jsonl`` or ``.parquet`` files; empty means the built-in
        corpus (Python standard-library sources, see ``corpus``).
    text_field: the JSONL field / parquet column holding a document.
    text_separator: splits plain text files into several documents (None: one document per file).
    tokenizer: ``"byte"`` or a ``tokenizer.json`` path (for ``load_tokenizer``; ``make_dataset`` takes the
        loaded tokenizer).
    seed: shuffle seed, in [0, 2**32).
    num_epochs: passes over the data; None repeats forever.
    shuffle: False keeps the source order (for debugging).
    read_threads: threads tokenizing documents ahead (grain ``ReadOptions.num_threads``; order is kept).
    prefetch_batches: batches prepared ahead in a background thread (0: none).
    """

    sources: tuple[str, ...] = ()
    text_field: str = "text"
    text_separator: str | None = None
    tokenizer: str = BYTE_TOKENIZER_SPEC
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    read_threads: int = 2
    prefetch_batches: int = 2

    def __post_init__(self):
        sources = (self.sources,) if isinstance(self.sources, str) else tuple(self.sources)  # not per character
        object.__setattr__(self, "sources", sources)
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if not self.text_field:
            raise ValueError("text_field must be a non-empty string")
        if self.text_separator == "":
            raise ValueError("text_separator must be None or a non-empty string")
        if self.read_threads < 0 or self.prefetch_batches < 0:
            raise ValueError("read_threads and prefetch_batches must be >= 0")


def load_documents(config: DataConfig) -> list[str]:
    """The documents of ``config.sources``, or the built-in corpus when there are none."""
    if not config.sources:
        return builtin_corpus_documents()
    return read_documents(config.sources, text_field=config.text_field, text_separator=config.text_separator)


def shard_documents(documents: list[str], *, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's documents: every ``process_count``-th one from ``process_index`` (disjoint, complete)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    shard = grain.MapDataset.source(documents)[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(f"process {process_index} of {process_count} has no documents ({len(documents)} in all)")
    return shard


def make_dataset(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    documents: list[str] | None = None,
) -> grain.IterDataset:
    """The packed, batched training stream of this process (see the module docstring).

    Each element is a dict of numpy arrays ``[global_batch_size // process_count, seq_len]``: ``inputs``,
    ``targets``, ``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32). ``documents`` overrides
    ``config.sources`` (already-loaded text, e.g. in tests).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if process_count < 1 or global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a positive multiple of process_count ({process_count})"
        )
    batch_size = global_batch_size // process_count
    documents = load_documents(config) if documents is None else documents
    dataset = shard_documents(documents, process_index=process_index, process_count=process_count)
    if config.shuffle:
        dataset = dataset.shuffle(seed=config.seed)
    dataset = dataset.repeat(config.num_epochs)
    dataset = dataset.map(functools.partial(document_token_ids, tokenizer))
    read_options = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=8 * config.read_threads + 1)
    packed = PackedIterDataset(dataset.to_iter_dataset(read_options), seq_len=seq_len)
    batched = packed.batch(
        batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
    )
    if config.prefetch_batches:
        batched = grain.experimental.ThreadPrefetchIterDataset(batched, prefetch_buffer_size=config.prefetch_batches)
    return batched


def state_to_json(iterator: grain.DatasetIterator) -> str:
    """The iterator's position as JSON text (what grain's orbax handler writes, too)."""
    return json.dumps(iterator.get_state())


def state_from_json(iterator: grain.DatasetIterator, text: str) -> None:
    """Moves a fresh iterator of the same dataset to the position saved by ``state_to_json``."""
    state: dict[str, Any] = json.loads(text)
    iterator.set_state(state)
