"""The model's forward pass over one chunk of tokens with a ``GenerationCache``: prefill chunks and decode steps.

The layer groups run in a Python loop (not a scan), each on its own unstacked weights and its own cache arrays, so
that a donated cache is updated in place (a scan would slice the stacked cache and weights on every step).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model.cache import GenerationCache
from minimax_jax.model.norms_rope import rms_norm
from minimax_jax.model.transformer import MiniMaxForCausalLM


@dataclasses.dataclass(frozen=True)
class InferenceGraph:
    """The static (hashable) half of a model prepared for cached inference."""

    config: ModelConfig
    group_graph: nnx.GraphDef
    dtype: jnp.dtype


class InferenceWeights(NamedTuple):
    """The array half: the weights with the layer-group stack split into one state per group."""

    embed: jax.Array
    groups: tuple[nnx.State, ...]
    final_norm: jax.Array
    lm_head: jax.Array


def split_for_inference(model: MiniMaxForCausalLM) -> tuple[InferenceGraph, InferenceWeights]:
    """Unstacks the scanned layer groups once (a copy of the layer weights) for ``forward_chunk``."""
    group_graph, stacked = nnx.split(model.groups)
    groups = tuple(jax.tree.map(lambda a, g=g: a[g], stacked) for g in range(model.config.num_layer_groups))
    weights = InferenceWeights(model.embed_tokens[...], groups, model.final_norm.weight[...], model.lm_head[...])
    return InferenceGraph(model.config, group_graph, jnp.dtype(model.dtype)), weights


def forward_chunk(graph: InferenceGraph, weights: InferenceWeights, cache: GenerationCache, input_ids: jax.Array, *,
                  kv_block: int | None, all_logits: bool) -> tuple[jax.Array, GenerationCache]:
    """Runs ``input_ids`` ``[batch, chunk]`` (slots ``cache.index + i``) and returns fp32 logits and the new cache.

    Slots before ``cache.starts[b]`` are padding: their k and v never enter a lightning state and no query attends
    to them. RoPE positions count from 0 at each row's first real slot. Logits are ``[batch, chunk, vocab]`` with
    ``all_logits``, else those of the chunk's last position ``[batch, vocab]``.
    """
    config = graph.config
    chunk = input_ids.shape[1]
    slots = cache.index + jnp.arange(chunk, dtype=jnp.int32)
    valid = slots[None, :] >= cache.starts[:, None]
    positions = jnp.maximum(slots[None, :] - cache.starts[:, None], 0)
    h = weights.embed[input_ids].astype(graph.dtype)
    layers, size = list(cache.layers), config.layer_group_size
    for g, group_state in enumerate(weights.groups):
        group = nnx.merge(graph.group_graph, group_state)
        h, entries = group.call_with_cache(
            h, group_index=g, entries=tuple(layers[g * size:(g + 1) * size]), positions=positions, valid=valid,
            cache_index=cache.index, key_start=cache.starts, kv_block=kv_block)
        layers[g * size:(g + 1) * size] = entries
    if not all_logits:
        h = h[:, -1]
    h = rms_norm(h, weights.final_norm, config.rms_norm_eps)
    logits = jnp.einsum("...d,dv->...v", h, weights.lm_head.astype(graph.dtype), preferred_element_type=jnp.float32)
    return logits, GenerationCache(tuple(layers), cache.index + chunk, cache.starts)
