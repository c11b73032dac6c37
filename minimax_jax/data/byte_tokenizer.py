"""The built-in tokenizer: one token per UTF-8 byte (ids 0..255), so the tiny default needs no download."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids; decoding replaces ids outside 0..255 and broken UTF-8 with U+FFFD.

    All 256 ids are bytes, so there is no room for special tokens: ``bos_id`` and ``eos_id`` are ``None`` and
    document boundaries are carried by the packer's segment ids alone.
    """

    vocab_size = 256
    bos_id: int | None = None
    eos_id: int | None = None

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32, one per UTF-8 byte) of ``text``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of ``ids``; invalid ids and broken UTF-8 become U+FFFD."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        data = bytes(i if 0 <= i < 256 else 0xFF for i in ids)  # 0xFF is never valid UTF-8 -> U+FFFD
        return data.decode("utf-8", errors="replace")
