"""The generation cache: a fixed-size fp32 state per lightning layer and a preallocated KV cache per softmax layer.

Layout (left padding, see ``minimax_jax/infer/__init__.py`` for why): every row's tokens occupy the same cache slots
``0 .. index - 1``; row b's real tokens are the slots ``starts[b] .. index - 1`` and the slots before are padding.
So one write index serves the whole batch (a chunk or a decoded token goes to ``index`` in every row), and each
row's length is ``index - starts[b]``.

The entries are stacked like the model's scanned weights: ``stacked[p]`` holds position p of the layer group for
every group at once (a leading axis of ``num_layer_groups``), so a ``lax.scan`` over the groups carries the whole
cache and updates group g's slice in place. Global layer ``l`` is group ``l // group_size``, position
``l % group_size``; ``GenerationCache.layer(l)`` returns its entry without the group axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from minimax_jax.config import LIGHTNING, ModelConfig


class LightningCache(NamedTuple):
    """State of one lightning layer: fp32 ``[batch, heads, head_dim, head_dim]``, whatever the length.

    In ``GenerationCache.stacked`` the array has a leading ``[num_layer_groups]`` axis."""

    state: jax.Array


class KVCache(NamedTuple):
    """Keys and values of one softmax layer, ``[batch, capacity, kv_heads, head_dim]`` each (RoPE already applied).

    In ``GenerationCache.stacked`` each array has a leading ``[num_layer_groups]`` axis."""

    keys: jax.Array
    values: jax.Array


CacheEntry = LightningCache | KVCache


class GenerationCache(NamedTuple):
    """Everything a decode step needs from the past: one stacked entry per group position plus the slot bookkeeping."""

    stacked: tuple[CacheEntry, ...]  # [p]: position p of the layer group, arrays [num_layer_groups, batch, ...]
    index: jax.Array  # int32 [], slots written so far (shared by all rows)
    starts: jax.Array  # int32 [batch], first real (non-padding) slot of each row

    @property
    def lengths(self) -> jax.Array:
        """Real tokens held per row, int32 ``[batch]``."""
        return self.index - self.starts

    @property
    def capacity(self) -> int:
        """Slots preallocated per softmax layer (0 for a model without softmax layers)."""
        return max((entry.keys.shape[2] for entry in self.stacked if isinstance(entry, KVCache)), default=0)

    def layer(self, layer: int) -> CacheEntry:
        """The entry of global layer ``layer`` (no group axis): a view for inspection, not for updates."""
        group, position = divmod(layer, len(self.stacked))
        return entry_of_group(self.stacked[position], group)


def entry_of_group(entry: CacheEntry, group: jax.Array | int) -> CacheEntry:
    """Group ``group``'s slice of a stacked entry (``group`` may be traced: the scan's group index)."""
    return jax.tree.map(lambda a: a[group], entry)


def write_group(stacked: CacheEntry, group: jax.Array | int, new: CacheEntry, index: jax.Array,
                chunk: int) -> CacheEntry:
    """``stacked`` with group ``group`` replaced by the layer's updated ``new`` entry.

    A lightning state is replaced whole. Of a KV cache only the ``chunk`` slots written at ``index`` are copied
    back (the other slots are unchanged), so a decode step writes one slot per softmax layer into the cache.
    """
    if isinstance(stacked, LightningCache):
        return LightningCache(stacked.state.at[group].set(new.state))

    def write(old: jax.Array, updated: jax.Array) -> jax.Array:
        written = jax.lax.dynamic_slice_in_dim(updated, index, chunk, axis=1)
        return jax.lax.dynamic_update_slice(old, written[None], (group, 0, index, 0, 0))

    return KVCache(write(stacked.keys, new.keys), write(stacked.values, new.values))


def create_cache(config: ModelConfig, starts: jax.Array, capacity: int, *, kv_dtype=jnp.float32,
                 mesh: Mesh | None = None) -> GenerationCache:
    """An empty cache for ``len(starts)`` rows whose real tokens begin at slot ``starts[b]``.

    ``kv_dtype`` is the model's compute dtype (keys and values are stored as computed); lightning states are fp32.
    With ``mesh``, every array is placed like activations: batch over the batch axes, heads over the tensor axis.
    """
    starts = jnp.asarray(starts, jnp.int32)
    groups, batch = config.num_layer_groups, starts.shape[0]
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    stacked: list[CacheEntry] = []
    for attn_type in config.group_pattern:
        if attn_type == LIGHTNING:
            stacked.append(LightningCache(jnp.zeros((groups, batch, heads, head_dim, head_dim), jnp.float32)))
        else:
            shape = (groups, batch, capacity, kv_heads, head_dim)
            stacked.append(KVCache(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype)))
    cache = GenerationCache(tuple(stacked), jnp.zeros((), jnp.int32), starts)
    return cache if mesh is None else jax.device_put(cache, cache_shardings(cache, mesh))


def cache_shardings(cache: GenerationCache, mesh: Mesh) -> GenerationCache:
    """``NamedSharding``s for ``cache`` on ``mesh``, with the logical axes of the activations they come from (the
    group axis is not split, like the stacked weights' "layers" axis)."""
    from minimax_jax.parallel.sharding import activation_spec, check_divisible

    def sharding(array: jax.Array, logical: tuple[str | None, ...], name: str) -> NamedSharding:
        check_divisible(name, array.shape, logical, mesh)
        return NamedSharding(mesh, activation_spec(logical, mesh))

    stacked = []
    for p, entry in enumerate(cache.stacked):
        if isinstance(entry, LightningCache):
            logical = ("layers", "batch", "heads", None, None)
            stacked.append(LightningCache(sharding(entry.state, logical, f"cache.{p}.state")))
        else:
            logical = ("layers", "batch", None, "kv_heads", None)
            stacked.append(KVCache(sharding(entry.keys, logical, f"cache.{p}.keys"),
                                   sharding(entry.values, logical, f"cache.{p}.values")))
    return GenerationCache(tuple(stacked), NamedSharding(mesh, activation_spec((), mesh)),
                           sharding(cache.starts, ("batch",), "cache.starts"))


def cache_bytes(cache: GenerationCache) -> dict[str, int]:
    """Bytes held by the lightning states and by the KV caches."""
    lightning = sum(e.state.nbytes for e in cache.stacked if isinstance(e, LightningCache))
    kv = sum(e.keys.nbytes + e.values.nbytes for e in cache.stacked if isinstance(e, KVCache))
    return {"lightning_state": int(lightning), "kv": int(kv)}


__all__ = ["CacheEntry", "GenerationCache", "KVCache", "LightningCache", "cache_bytes", "cache_shardings",
           "create_cache", "entry_of_group", "write_group"]
