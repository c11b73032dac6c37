"""The generation cache: a fixed-size fp32 state per lightning layer and a preallocated KV cache per softmax layer.

Layout (left padding, see ``minimax_jax/infer/__init__.py`` for why): every row's tokens occupy the same cache slots
``0 .. index - 1``; row b's real tokens are the slots ``starts[b] .. index - 1`` and the slots before are padding.
So one write index serves the whole batch (a chunk or a decoded token goes to ``index`` in every row), and each
row's length is ``index - starts[b]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from minimax_jax.config import LIGHTNING, ModelConfig


class LightningCache(NamedTuple):
    """State of one lightning layer: fp32 ``[batch, heads, head_dim, head_dim]``, whatever the length."""

    state: jax.Array


class KVCache(NamedTuple):
    """Keys and values of one softmax layer, ``[batch, capacity, kv_heads, head_dim]`` each (RoPE already applied)."""

    keys: jax.Array
    values: jax.Array


class GenerationCache(NamedTuple):
    """Everything a decode step needs from the past: one entry per layer (global order) plus the slot bookkeeping."""

    layers: tuple[LightningCache | KVCache, ...]
    index: jax.Array  # int32 [], slots written so far (shared by all rows)
    starts: jax.Array  # int32 [batch], first real (non-padding) slot of each row

    @property
    def lengths(self) -> jax.Array:
        """Real tokens held per row, int32 ``[batch]``."""
        return self.index - self.starts

    @property
    def capacity(self) -> int:
        """Slots preallocated per softmax layer (0 for a model without softmax layers)."""
        return max((entry.keys.shape[1] for entry in self.layers if isinstance(entry, KVCache)), default=0)


def create_cache(config: ModelConfig, starts: jax.Array, capacity: int, *, kv_dtype=jnp.float32,
                 mesh: Mesh | None = None) -> GenerationCache:
    """An empty cache for ``len(starts)`` rows whose real tokens begin at slot ``starts[b]``.

    ``kv_dtype`` is the model's compute dtype (keys and values are stored as computed); lightning states are fp32.
    With ``mesh``, every array is placed like activations: batch over the batch axes, heads over the tensor axis.
    """
    starts = jnp.asarray(starts, jnp.int32)
    batch = starts.shape[0]
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layers: list[LightningCache | KVCache] = []
    for attn_type in config.attn_type_list:
        if attn_type == LIGHTNING:
            layers.append(LightningCache(jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32)))
        else:
            shape = (batch, capacity, kv_heads, head_dim)
            layers.append(KVCache(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype)))
    cache = GenerationCache(tuple(layers), jnp.zeros((), jnp.int32), starts)
    return cache if mesh is None else jax.device_put(cache, cache_shardings(cache, mesh))


def cache_shardings(cache: GenerationCache, mesh: Mesh) -> GenerationCache:
    """``NamedSharding``s for ``cache`` on ``mesh``, with the logical axes of the activations they come from."""
    from minimax_jax.parallel.sharding import activation_spec, check_divisible

    def sharding(array: jax.Array, logical: tuple[str | None, ...], name: str) -> NamedSharding:
        check_divisible(name, array.shape, logical, mesh)
        return NamedSharding(mesh, activation_spec(logical, mesh))

    layers = []
    for i, entry in enumerate(cache.layers):
        if isinstance(entry, LightningCache):
            layers.append(LightningCache(sharding(entry.state, ("batch", "heads", None, None), f"cache.{i}.state")))
        else:
            logical = ("batch", None, "kv_heads", None)
            layers.append(KVCache(sharding(entry.keys, logical, f"cache.{i}.keys"),
                                  sharding(entry.values, logical, f"cache.{i}.values")))
    return GenerationCache(tuple(layers), NamedSharding(mesh, activation_spec((), mesh)),
                           sharding(cache.starts, ("batch",), "cache.starts"))


def cache_bytes(cache: GenerationCache) -> dict[str, int]:
    """Bytes held by the lightning states and by the KV caches."""
    lightning = sum(e.state.nbytes for e in cache.layers if isinstance(e, LightningCache))
    kv = sum(e.keys.nbytes + e.values.nbytes for e in cache.layers if isinstance(e, KVCache))
    return {"lightning_state": int(lightning), "kv": int(kv)}


__all__ = ["GenerationCache", "KVCache", "LightningCache", "cache_bytes", "cache_shardings", "create_cache"]
