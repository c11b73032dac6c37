"""The safetensors file format, read and written tensor by tensor with plain file I/O.

The ``safetensors`` package memory-maps whole files, so every tensor read stays resident in the process; a
converter of a 900 GB checkpoint must not do that. A safetensors file is ``u64 header length | JSON header |
data``, the header giving each tensor's dtype, shape and byte range. This module parses and validates that header
(truncated files, overlapping or out-of-range offsets, unknown dtypes: errors name the file and the tensor), reads
one tensor with ``pread`` and writes files whose header is known up front, so data streams out one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16), "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = frozenset(DTYPES[n] for n in ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"))
_MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsError(ValueError):
    """A missing, truncated or malformed safetensors file or index; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``path`` at absolute byte ``offset``, ``nbytes`` long."""

    name: str
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """Every tensor of one file, validated against the file size (raises ``SafetensorsError``)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: truncated: {size} bytes, no header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise SafetensorsError(f"{path}: truncated or corrupt: header of {header_len} bytes in a "
                                       f"{size}-byte file")
            raw = f.read(header_len)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt header (not JSON): {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt header (not a JSON object)")
    data_start, entries, spans = 8 + header_len, {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise SafetensorsError(f"{path}: tensor {name!r}: byte range [{begin}, {end}) does not hold "
                                   f"{info['dtype']} {list(shape)} ({nbytes} bytes)")
        if data_start + end > size:
            raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, the file "
                                   f"has {size}")
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, nbytes)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise SafetensorsError(f"{path}: corrupt header: tensors {a!r} and {b!r} overlap")
    return entries


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """The tensor's array (a fresh host buffer, nothing memory-mapped)."""
    buffer = bytearray(entry.nbytes)
    with open(entry.path, "rb") as f:
        f.seek(entry.offset)
        got = f.readinto(buffer)
    if got != entry.nbytes:
        raise SafetensorsError(f"{entry.path}: truncated: tensor {entry.name!r} has {got} of {entry.nbytes} bytes")
    return np.frombuffer(buffer, entry.dtype).reshape(entry.shape)


def read_folder_index(folder: str) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint folder (``model.safetensors`` or an index and its shards), validated.

    With an index, each tensor must be in the file the index names, and each listed file must exist.
    """
    index_path, single_path = os.path.join(folder, INDEX_FILE), os.path.join(folder, SINGLE_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index_path}: not a safetensors index (needs 'weight_map'): {e}") from None
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single_path):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    entries: dict[str, TensorEntry] = {}
    for file_name in files:
        path = os.path.join(folder, file_name)
        if not os.path.exists(path):
            raise SafetensorsError(f"{index_path}: lists {file_name}, which does not exist")
        for name, entry in read_header(path).items():
            if name in entries:
                raise SafetensorsError(f"tensor {name!r} is in both {entries[name].path} and {path}")
            if weight_map is not None and weight_map.get(name) != file_name:
                raise SafetensorsError(f"{path}: holds tensor {name!r}, which the index places in "
                                       f"{weight_map.get(name)}")
            entries[name] = entry
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(entries))
        if absent:
            raise SafetensorsError(f"{index_path}: {len(absent)} tensor(s) listed but not in their file: "
                                   + ", ".join(absent[:10]))
    return entries


# ---------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: name, dtype, shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors split into consecutive shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def _header_bytes(specs: Sequence[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[np.dtype(spec.dtype)], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str, specs: Sequence[TensorSpec], produce: Callable[[TensorSpec], np.ndarray],
               on_tensor: Callable[[TensorSpec], None] | None = None) -> None:
    """Writes one safetensors file, asking ``produce`` for one tensor at a time (checked against its spec)."""
    with open(path, "wb") as f:
        f.write(_header_bytes(specs))
        for spec in specs:
            array = np.asarray(produce(spec))
            if array.shape != tuple(spec.shape) or array.dtype != np.dtype(spec.dtype):
                raise SafetensorsError(f"tensor {spec.name!r}: produced {array.dtype} {array.shape}, expected "
                                       f"{np.dtype(spec.dtype)} {tuple(spec.shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            if on_tensor is not None:
                on_tensor(spec)


def write_folder(folder: str, specs: Sequence[TensorSpec], produce: Callable[[TensorSpec], np.ndarray],
                 max_shard_bytes: int, on_tensor: Callable[[TensorSpec], None] | None = None) -> list[str]:
    """Writes ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``; returns the files."""
    shards = plan_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write_file(os.path.join(folder, name), shard, produce, on_tensor)
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
             "weight_map": {spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard}}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names + [INDEX_FILE]


def total_bytes(entries: Iterable[TensorEntry]) -> int:
    return sum(e.nbytes for e in entries)
