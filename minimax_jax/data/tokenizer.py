"""Tokenizers for training data: the built-in byte tokenizer or a Hugging Face ``tokenizer.json``.

Document policy (``document_token_ids``): a document becomes ``[bos] + encode(text) + [eos]``, where BOS is
added only when the tokenizer has a ``bos_id`` and EOS only when it has an ``eos_id``. The byte tokenizer has
neither; the packer's segment ids mark document boundaries either way. For a Hugging Face tokenizer the EOS
token is the ``eos_token`` argument, else the ``eos_token`` of a ``tokenizer_config.json`` next to the
``tokenizer.json``, else none; BOS is used only when ``bos_token`` is given explicitly (many configs name a
BOS token the model was never trained to expect).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from minimax_jax.data.byte_tokenizer import ByteTokenizer

BYTE_TOKENIZER_SPEC = "byte"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray | list[int]) -> str: ...


class HFTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the ``Tokenizer`` interface.

    ``encode`` never adds special tokens itself (no post-processor templates); ``document_token_ids`` applies
    the BOS/EOS policy, so it is the same for every tokenizer.
    """

    def __init__(self, path: str | Path, *, eos_token: str | None = None, bos_token: str | None = None):
        import tokenizers  # lazy: only needed for Hugging Face tokenizers

        self.path = _tokenizer_json_path(Path(path))
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if eos_token is None:
            eos_token = _special_token_from_config(self.path.parent / "tokenizer_config.json", "eos_token")
        self.eos_id: int | None = self._token_id(eos_token)
        self.bos_id: int | None = self._token_id(bos_token)

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary of {self.path}")
        return int(token_id)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32) of ``text``, without special tokens."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of ``ids``; special tokens are kept in the text."""
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def _tokenizer_json_path(path: Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` when ``path`` is a directory."""
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def _special_token_from_config(config_path: Path, key: str) -> str | None:
    """The ``key`` token of a Hugging Face ``tokenizer_config.json`` (a string or ``{"content": ...}``)."""
    if not config_path.is_file():
        return None
    value = json.loads(config_path.read_text(encoding="utf-8")).get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(spec: str, *, eos_token: str | None = None, bos_token: str | None = None) -> Tokenizer:
    """``"byte"`` gives the built-in ``ByteTokenizer``; anything else is a ``tokenizer.json`` path or its folder."""
    if spec == BYTE_TOKENIZER_SPEC:
        if eos_token is not None or bos_token is not None:
            raise ValueError("the byte tokenizer has no special tokens; eos_token/bos_token must be None")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token, bos_token=bos_token)


def document_token_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The int32 token ids of one document: ``[bos] + encode(text) + [eos]`` (BOS/EOS only where defined)."""
    parts = [np.asarray(tokenizer.encode(text), dtype=np.int32)]
    if tokenizer.bos_id is not None:
        parts.insert(0, np.asarray([tokenizer.bos_id], dtype=np.int32))
    if tokenizer.eos_id is not None:
        parts.append(np.asarray([tokenizer.eos_id], dtype=np.int32))
    return np.concatenate(parts)
