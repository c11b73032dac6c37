"""The model's forward pass over one chunk of tokens with a ``GenerationCache``: prefill chunks and decode steps.

The layer groups run in a ``lax.scan`` over the model's own stacked weights (no second copy of them), as in
training, so the traced program does not grow with depth. The stacked cache rides in the scan's carry (not in xs/ys,
which would hold an input and an output copy of it): each group reads its slice, and writes back in place a lightning
state whole and a KV cache only at the chunk's slots.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model.cache import CacheEntry, GenerationCache, entry_of_group, write_group
from minimax_jax.model.norms_rope import rms_norm
from minimax_jax.model.transformer import MiniMaxForCausalLM


@dataclasses.dataclass(frozen=True)
class InferenceGraph:
    """The static (hashable) half of a model prepared for cached inference."""

    config: ModelConfig
    group_graph: nnx.GraphDef
    dtype: jnp.dtype


class InferenceWeights(NamedTuple):
    """The array half: the model's own arrays, the layer groups' state stacked on a leading group axis."""

    embed: jax.Array
    groups: nnx.State
    final_norm: jax.Array
    lm_head: jax.Array


def split_for_inference(model: MiniMaxForCausalLM) -> tuple[InferenceGraph, InferenceWeights]:
    """The static graph and the arrays of ``model`` for ``forward_chunk``; the arrays are shared, not copied."""
    group_graph, stacked = nnx.split(model.groups)
    weights = InferenceWeights(model.embed_tokens[...], stacked, model.final_norm.weight[...], model.lm_head[...])
    return InferenceGraph(model.config, group_graph, jnp.dtype(model.dtype)), weights


def forward_chunk(graph: InferenceGraph, weights: InferenceWeights, cache: GenerationCache, input_ids: jax.Array, *,
                  kv_block: int | None, all_logits: bool) -> tuple[jax.Array, GenerationCache]:
    """Runs ``input_ids`` ``[batch, chunk]`` (slots ``cache.index + i``) and returns fp32 logits and the new cache.

    Slots before ``cache.starts[b]`` are padding: their k and v never enter a lightning state and no query attends
    to them. RoPE positions count from 0 at each row's first real slot. Logits are ``[batch, chunk, vocab]`` with
    ``all_logits``, else those of the chunk's last position ``[batch, vocab]``.
    """
    chunk = input_ids.shape[1]
    slots = cache.index + jnp.arange(chunk, dtype=jnp.int32)
    valid = slots[None, :] >= cache.starts[:, None]
    positions = jnp.maximum(slots[None, :] - cache.starts[:, None], 0)
    h = weights.embed[input_ids].astype(graph.dtype)
    h, stacked = scan_groups(graph, weights.groups, cache, h, positions=positions, valid=valid, kv_block=kv_block)
    if not all_logits:
        h = h[:, -1]
    h = rms_norm(h, weights.final_norm, graph.config.rms_norm_eps)
    logits = jnp.einsum("...d,dv->...v", h, weights.lm_head.astype(graph.dtype), preferred_element_type=jnp.float32)
    return logits, GenerationCache(stacked, cache.index + chunk, cache.starts)


def scan_groups(graph: InferenceGraph, groups: nnx.State, cache: GenerationCache, h: jax.Array, *,
                positions: jax.Array, valid: jax.Array, kv_block: int | None
                ) -> tuple[jax.Array, tuple[CacheEntry, ...]]:
    """The hidden states after every layer group and the updated stacked cache entries."""
    chunk = h.shape[1]

    def body(carry, xs):
        h, stacked = carry
        group_state, g = xs
        group = nnx.merge(graph.group_graph, group_state)
        h, entries = group.call_with_cache(
            h, group_index=g, entries=tuple(entry_of_group(entry, g) for entry in stacked), positions=positions,
            valid=valid, cache_index=cache.index, key_start=cache.starts, kv_block=kv_block)
        stacked = tuple(write_group(old, g, new, cache.index, chunk) for old, new in zip(stacked, entries, strict=True))
        return (h, stacked), None

    group_indices = jnp.arange(graph.config.num_layer_groups, dtype=jnp.int32)
    (h, stacked), _ = jax.lax.scan(body, (h, cache.stacked), (groups, group_indices))
    return h, stacked
