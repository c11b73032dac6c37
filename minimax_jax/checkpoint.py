"""Official MiniMax-Text-01 safetensors <-> this model's stacked parameters.

``official_tensor_mappings`` is the ONE table relating an official tensor name to a slice of a stacked parameter
(plus the layout change); ``official_to_param`` / ``param_to_official`` apply it in either direction. The loader
(``from_pretrained``), the exporter (``to_official_tensors``) and the checkpoint converters all use them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.config import LIGHTNING, ModelConfig
from minimax_jax.model.transformer import MiniMaxForCausalLM

ParamPath = tuple[str | int, ...]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers that transformers' save_pretrained writes for every lightning layer; derived from the config, not weights.
DERIVED_LIGHTNING_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists every missing, unexpected or mis-shaped tensor."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """Where one official tensor lives in the model.

    The official array, transposed when ``transpose`` is set, is reshaped to the parameter's trailing shape and
    stored at ``state[param_path][index]`` (``index`` selects the layer group and, for experts, the expert).
    """

    name: str
    param_path: ParamPath
    index: tuple[int, ...]
    official_shape: tuple[int, ...]
    transpose: bool


def official_tensor_mappings(config: ModelConfig) -> list[TensorMapping]:
    """Every tensor of an official checkpoint for ``config``, in checkpoint order."""
    hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                         config.num_key_value_heads, config.head_dim)
    inter, num_experts, group_size = config.intermediate_size, config.num_local_experts, config.layer_group_size
    mappings = [TensorMapping("model.embed_tokens.weight", ("embed_tokens",), (), (config.vocab_size, hidden), False)]
    for i, attn_type in enumerate(config.attn_type_list):
        group, prefix = (i // group_size,), f"model.layers.{i}"
        layer: ParamPath = ("groups", "layers", i % group_size)

        def add(name: str, path: ParamPath, shape: tuple[int, ...], transpose: bool, index=group, prefix=prefix,
                layer=layer) -> None:
            mappings.append(TensorMapping(f"{prefix}.{name}", layer + path, index, shape, transpose))

        add("input_layernorm.weight", ("input_norm", "weight"), (hidden,), False)
        if attn_type == LIGHTNING:
            add("self_attn.qkv_proj.weight", ("mixer", "qkv_proj"), (3 * heads * head_dim, hidden), True)
            add("self_attn.output_gate.weight", ("mixer", "output_gate"), (heads * head_dim, hidden), True)
            add("self_attn.norm.weight", ("mixer", "norm"), (heads * head_dim,), False)
            add("self_attn.out_proj.weight", ("mixer", "out_proj"), (hidden, heads * head_dim), True)
        else:
            add("self_attn.q_proj.weight", ("mixer", "q_proj"), (heads * head_dim, hidden), True)
            add("self_attn.k_proj.weight", ("mixer", "k_proj"), (kv_heads * head_dim, hidden), True)
            add("self_attn.v_proj.weight", ("mixer", "v_proj"), (kv_heads * head_dim, hidden), True)
            add("self_attn.o_proj.weight", ("mixer", "o_proj"), (hidden, heads * head_dim), True)
        add("post_attention_layernorm.weight", ("post_attention_norm", "weight"), (hidden,), False)
        add("block_sparse_moe.gate.weight", ("moe", "router"), (num_experts, hidden), True)
        for e in range(num_experts):
            expert = f"block_sparse_moe.experts.{e}"
            add(f"{expert}.w1.weight", ("moe", "w13"), (inter, hidden), True, index=group + (e, 0))
            add(f"{expert}.w2.weight", ("moe", "w2"), (hidden, inter), True, index=group + (e,))
            add(f"{expert}.w3.weight", ("moe", "w13"), (inter, hidden), True, index=group + (e, 1))
    mappings.append(TensorMapping("model.norm.weight", ("final_norm", "weight"), (), (hidden,), False))
    mappings.append(TensorMapping("lm_head.weight", ("lm_head",), (), (config.vocab_size, hidden), True))
    return mappings


def derived_buffer_names(config: ModelConfig) -> set[str]:
    """Names of the lightning-layer buffers transformers writes (ignored on load)."""
    return {f"model.layers.{i}.self_attn.{buffer}" for i, t in enumerate(config.attn_type_list) if t == LIGHTNING
            for buffer in DERIVED_LIGHTNING_BUFFERS}


def transpose_2d(array: np.ndarray, block_rows: int = 256) -> np.ndarray:
    """``array.T`` as a new C-contiguous array, copied in row blocks (about 3x faster than numpy's for big 2D)."""
    out = np.empty(array.shape[::-1], array.dtype)
    for start in range(0, array.shape[0], block_rows):
        out[:, start:start + block_rows] = array[start:start + block_rows].T
    return out


def official_to_param(mapping: TensorMapping, array: np.ndarray, slice_shape: tuple[int, ...]) -> np.ndarray:
    """Official layout -> the parameter slice's layout."""
    return (transpose_2d(array) if mapping.transpose else array).reshape(slice_shape)


def param_to_official(mapping: TensorMapping, param_slice: np.ndarray) -> np.ndarray:
    """A parameter slice -> the official layout (inverse of ``official_to_param``)."""
    if mapping.transpose:
        return transpose_2d(param_slice.reshape(mapping.official_shape[::-1]))
    return param_slice.reshape(mapping.official_shape)


# ---------------------------------------------------------------------- export
def to_official_tensors(model: MiniMaxForCausalLM) -> dict[str, np.ndarray]:
    """All weights of ``model`` under their official names and layouts (host numpy arrays, param dtype)."""
    params = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return {m.name: param_to_official(m, params[m.param_path][m.index]) for m in official_tensor_mappings(model.config)}


# ---------------------------------------------------------------------- load
class _SafetensorsReader:
    """Name -> shape / array over a single file or an index-sharded set of safetensors files."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index_path, single_path = os.path.join(folder, INDEX_FILE), os.path.join(folder, SINGLE_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single_path):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
        self._handles = {name: safe_open(os.path.join(folder, name), framework="numpy") for name in files}
        self.file_of: dict[str, str] = {}
        for file_name, handle in self._handles.items():
            for key in handle.keys():
                self.file_of[key] = file_name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.file_of[name]].get_tensor(name)


def check_checkpoint_names(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raises ``CheckpointError`` listing every missing, unexpected and mis-shaped tensor (shapes: name -> shape)."""
    expected = {m.name: m.official_shape for m in official_tensor_mappings(config)}
    ignored = derived_buffer_names(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - ignored)
    misshaped = sorted(f"{name}: expected {expected[name]}, found {shapes[name]}"
                       for name in set(expected) & set(shapes) if tuple(shapes[name]) != expected[name])
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            problems.append(f"{len(names)} {label} tensor(s):\n  " + "\n  ".join(names))
    if problems:
        raise CheckpointError("checkpoint does not match the config:\n" + "\n".join(problems))


def _iter_param_arrays(config: ModelConfig, reader: _SafetensorsReader, abstract_params: dict,
                       np_dtype) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """Assembles every stacked parameter from its official tensors, one parameter at a time."""
    by_path: dict[ParamPath, list[TensorMapping]] = {}
    for m in official_tensor_mappings(config):
        by_path.setdefault(m.param_path, []).append(m)
    for path, mappings in by_path.items():
        shape = abstract_params[path].shape
        buffer = np.empty(shape, np_dtype)
        for m in mappings:
            buffer[m.index] = official_to_param(m, reader.get(m.name).astype(np_dtype), shape[len(m.index):])
        yield path, buffer


def from_pretrained(path: str | os.PathLike, dtype=jnp.float32) -> MiniMaxForCausalLM:
    """Loads a MiniMax-Text-01 checkpoint folder (config.json in either format + safetensors, single or sharded).

    Weights are stored and computed in ``dtype``. Raises ``CheckpointError`` naming every missing, unexpected or
    mis-shaped tensor; transformers' derived lightning buffers (slope_rate, query/key/diagonal_decay) are ignored.
    """
    folder = os.fspath(path)
    config = ModelConfig.from_json(folder)
    reader = _SafetensorsReader(folder)
    check_checkpoint_names(config, {name: reader.shape(name) for name in reader.file_of})

    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, dtype=dtype, param_dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    abstract_params = {p: v.get_value() for p, v in flat}
    if set(abstract_params) != {m.param_path for m in official_tensor_mappings(config)}:
        raise AssertionError("official_tensor_mappings does not cover exactly the model's parameters")
    loaded = dict(_iter_param_arrays(config, reader, abstract_params, np.dtype(dtype)))
    new_state = nnx.from_flat_state([(p, v.replace(jnp.asarray(loaded[p]))) for p, v in flat])
    return nnx.merge(graphdef, new_state)
