"""Concat-then-split packing of token documents into fixed-length rows for next-token training.

A document of n tokens gives n - 1 (input, target) pairs: ``inputs = tokens[:-1]``, ``targets = tokens[1:]``.
Pairs (not raw tokens) are packed, so a target never comes from another document and no pair is lost at a
document or row boundary: every token of a document appears as a target except its first, and as an input
except its last. A document with fewer than 2 tokens has no pair and contributes nothing.

Each row holds ``seq_len`` pairs. Documents are laid out in order; a document that does not fit in the room
left in a row is split, and its rest starts the next row(s) as a new segment whose positions restart at 0
(it is seen without its prefix; positions therefore stay below ``seq_len``). Only the last row of a finite
stream can be padded. Row fields, all ``[seq_len]``:

- ``inputs``, ``targets`` (int32): token ids, 0 on padding.
- ``segment_ids`` (int32): 1, 2, ... per document piece within the row, 0 on padding; lightning-attention
  state and softmax masks reset where it changes.
- ``positions`` (int32): position within the document piece, from 0.
- ``loss_mask`` (float32): 1 on real pairs, 0 on padding.

grain's ``ConcatThenSplitIterDataset`` packs the same way but (grain 0.2.18) its iterator state does not
survive a JSON round trip (the format grain's own orbax handler writes): ``(-1, -1)`` tuples come back as
lists and restoring then yields wrong rows. This packer keeps a small JSON-exact state instead.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding row."""
    row = {name: np.zeros(seq_len, dtype=np.int32) for name in ROW_FIELDS}
    row["loss_mask"] = np.zeros(seq_len, dtype=np.float32)
    return row


class PackedIterDataset(grain.IterDataset):
    """Packs a stream of 1-D token arrays (one per document) into rows; see the module docstring."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self._seq_len = seq_len

    def __iter__(self) -> grain.DatasetIterator:
        return _PackingIterator(self._parent.__iter__(), seq_len=self._seq_len)

    def __str__(self) -> str:
        return f"PackedIterDataset(seq_len={self._seq_len})"


class _PackingIterator(grain.DatasetIterator):
    """Builds one row per ``__next__``; at most one document is in progress between rows.

    State: the parent's state from before the document in progress was read, and how many of its pairs were
    already emitted (``pending`` False: no document in progress, the parent state is the current one).
    """

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._document: np.ndarray | None = None  # document in progress
        self._document_parent_state: dict[str, Any] | None = None  # parent state before it was read
        self._pairs_done = 0  # its pairs already emitted

    def _next_document(self) -> bool:
        """Reads the next document with at least one pair; False when the parent is exhausted."""
        while True:
            parent_state = copy.deepcopy(self._parent.get_state())
            try:
                tokens = np.asarray(next(self._parent), dtype=np.int32).reshape(-1)
            except StopIteration:
                return False
            if len(tokens) >= 2:
                self._document, self._document_parent_state, self._pairs_done = tokens, parent_state, 0
                return True

    def __next__(self) -> dict[str, np.ndarray]:
        row = empty_row(self._seq_len)
        filled, segment_id = 0, 0
        while filled < self._seq_len:
            if self._document is None and not self._next_document():
                break
            tokens, start = self._document, self._pairs_done
            take = min(len(tokens) - 1 - start, self._seq_len - filled)
            segment_id += 1
            span = slice(filled, filled + take)
            row["inputs"][span] = tokens[start : start + take]
            row["targets"][span] = tokens[start + 1 : start + take + 1]
            row["segment_ids"][span] = segment_id
            row["positions"][span] = np.arange(take, dtype=np.int32)
            row["loss_mask"][span] = 1.0
            filled += take
            self._pairs_done += take
            if self._pairs_done == len(tokens) - 1:
                self._document = None
        if filled == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._document is None:
            return {"parent": copy.deepcopy(self._parent.get_state()), "pending": False, "pairs_done": 0}
        return {"parent": copy.deepcopy(self._document_parent_state), "pending": True, "pairs_done": self._pairs_done}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._document = None
        if state["pending"]:
            if not self._next_document():
                raise ValueError(f"cannot restore packing state {state}: the parent has no document to resume")
            self._pairs_done = int(state["pairs_done"])
