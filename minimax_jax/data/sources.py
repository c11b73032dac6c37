"""Local text sources read into a list of documents (strings), in a deterministic order.

Formats, chosen by file extension: ``.jsonl`` (one JSON object per line, the document in ``text_field``),
``.parquet`` (the ``text_field`` column; needs ``pyarrow``), anything else is plain UTF-8 text: one document
per file, or several when ``text_separator`` is given. Globs are expanded and sorted, so every process of a
multi-host job sees the same documents in the same order. Empty documents are skipped (they hold no tokens).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = set("*?[")


def resolve_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs, ``**`` allowed), each glob sorted, in pattern order.

    A path that does not exist, or a glob that matches no file, raises ``FileNotFoundError`` naming it.
    """
    paths: list[Path] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"no file matches the data source pattern {pattern!r}")
            paths.extend(matches)
        else:
            path = Path(pattern)
            if not path.is_file():
                raise FileNotFoundError(f"data source file not found: {pattern}")
            paths.append(path)
    return paths


def read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` string of each non-blank line of a JSONL file."""
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{where}: JSONL record has no field {text_field!r}")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
            yield text


def read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` column of a parquet file (requires ``pyarrow``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(f"reading {path} needs pyarrow; pip install pyarrow") from error
    schema = pq.read_schema(path)
    if text_field not in schema.names:
        raise ValueError(f"{path}: parquet file has no column {text_field!r} (columns: {schema.names})")
    for text in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist():
        if not isinstance(text, str):
            raise ValueError(f"{path}: column {text_field!r} holds {type(text).__name__}, not a string")
        yield text


def read_text(path: Path, separator: str | None) -> Iterator[str]:
    """A plain UTF-8 text file as one document, or split on ``separator``."""
    text = path.read_text(encoding="utf-8")
    yield from (text.split(separator) if separator else [text])


def read_documents(
    patterns: Sequence[str], *, text_field: str = "text", text_separator: str | None = None
) -> list[str]:
    """All non-empty documents of the files named by ``patterns``, in order (see the module docstring)."""
    documents: list[str] = []
    for path in resolve_paths(patterns):
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            texts = read_jsonl(path, text_field)
        elif suffix in PARQUET_SUFFIXES:
            texts = read_parquet(path, text_field)
        else:
            texts = read_text(path, text_separator)
        documents.extend(text for text in texts if text)
    return documents
