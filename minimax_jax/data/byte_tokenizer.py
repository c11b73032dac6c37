"""The built-in tokenizer: one token per UTF-8 byte (ids 0..255), so the tiny default needs no download."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids; decoding replaces ids outside 0..255 and broken UTF-8 with U+FFFD."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        data = bytes(i if 0 <= i < 256 else 0xFF for i in ids)  # 0xFF is never valid UTF-8 -> U+FFFD
        return data.decode("utf-8", errors="replace")
