"""Tile-aligned dispatch of MoE token slots to expert rows, and back.

A token routed to k experts has k "slots" (``slot = token * k + choice``). The experts' grouped matmul
(``pallas_kernels.grouped_matmul``) wants each expert's slots on contiguous rows padded to whole tiles, so that
every row tile belongs to one expert. ``tile_layout`` builds that placement once per MoE layer:

    rows  [ e0 e0 e0 0 | e0 0 0 0 | e2 e2 e2 e2 | e2 0 0 0 | unused ... ]   (tile 4, expert 1 empty)

``to_rows`` gathers inputs into it; ``combine_rows`` sums each token's result rows back and ``from_rows`` gathers
per-slot results. ``to_rows`` and ``combine_rows`` are each other's transpose, as are ``from_rows`` and its
backward, so every gradient is a gather too (autodiff of a gather would give a scatter-add with atomics); padding
rows read zeros and receive nothing. Nothing is ever dropped: the layout has room for every slot at any expert
load. Inside ``jax.shard_map`` a gradient is summed over the manual axes its primal does not vary over
(``manual_axes``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.manual_axes import like_primal


class TileLayout(NamedTuple):
    """Where each slot goes. ``R`` rows (a multiple of the tile), ``S`` slots, ``G`` groups (experts)."""

    row_of_slot: jax.Array  # int32 [S]; R for a slot that belongs to no group
    slot_of_row: jax.Array  # int32 [R]; S for a padding row
    tile_group: jax.Array  # int32 [R // tile], non-decreasing; G for unused trailing tiles


def num_layout_rows(num_slots: int, num_groups: int, tile: int) -> int:
    """Rows that hold ``num_slots`` slots at any split over ``num_groups`` groups, each padded to whole tiles."""
    return -(-(num_slots + num_groups * (tile - 1)) // tile) * tile


def _narrowest_key(num_groups: int):
    """Smallest unsigned dtype that holds group ids 0..num_groups: a radix sort then makes fewer passes (on an H100
    the stable argsort of 64K keys took 63 us as uint8, 99 us as int32)."""
    return next(d for d in (jnp.uint8, jnp.uint16, jnp.uint32) if num_groups <= jnp.iinfo(d).max)


def tile_layout(slot_group: jax.Array, num_groups: int, tile: int) -> TileLayout:
    """Layout for slots with group ids ``slot_group`` int ``[S]`` (``num_groups`` = belongs to no group).

    Slots of one group keep their order (stable sort); groups are placed in id order, each starting on a tile.
    """
    num_slots = slot_group.shape[0]
    num_rows = num_layout_rows(num_slots, num_groups, tile)
    slot_group = slot_group.astype(jnp.int32)
    order = jnp.argsort(slot_group.astype(_narrowest_key(num_groups)), stable=True)
    sorted_group = slot_group[order]
    # group sizes from the sorted ids (a bincount is a scatter-add with atomics on a few addresses on GPU);
    # compare_all: one fused comparison (the default "scan" method is a device loop of ~log2(S) tiny kernels)
    group_ids = jnp.arange(num_groups + 1, dtype=jnp.int32)
    starts = jnp.searchsorted(sorted_group, group_ids, method="compare_all").astype(jnp.int32)
    sizes = starts[1:] - starts[:-1]
    padded = -(-sizes // tile) * tile
    padded_end = jnp.cumsum(padded)
    in_group = sorted_group < num_groups
    group = jnp.minimum(sorted_group, num_groups - 1)
    rank = jnp.arange(num_slots, dtype=jnp.int32) - starts[group]
    dest = jnp.where(in_group, padded_end[group] - padded[group] + rank, num_rows)
    row_of_slot = jnp.zeros(num_slots, jnp.int32).at[order].set(dest, unique_indices=True)
    slot_of_row = jnp.full(num_rows, num_slots, jnp.int32).at[dest].set(order.astype(jnp.int32), mode="drop")
    tile_starts = jnp.arange(num_rows // tile, dtype=jnp.int32) * tile
    tile_group = jnp.searchsorted(padded_end, tile_starts, side="right", method="compare_all").astype(jnp.int32)
    return TileLayout(row_of_slot, slot_of_row, tile_group)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[index]`` along axis 0, zeros where ``index`` is out of range (padding)."""
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """``_take`` for a gather that nothing fuses into: 16-bit rows move as pairs packed in uint32 words (on an
    H100 the 32K x 1024 bf16 to-rows gather took 98 us this way, 119 us element by element; a Pallas-Triton row
    copy was no faster)."""
    if x.dtype.itemsize != 2 or x.shape[-1] % 2:
        return _take(x, index)
    words = jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), jnp.uint32)
    rows = _take(words, index)
    return jax.lax.bitcast_convert_type(rows, x.dtype).reshape(*rows.shape[:-1], x.shape[-1])


def _gather_rows(x, layout, slots_per_item):
    return _take_rows(x, layout.slot_of_row // slots_per_item)


def _sum_slots(rows, layout, slots_per_item):
    """Per item, the sum of its ``slots_per_item`` rows (fp32 sum), ``[S // slots_per_item, D]``."""
    slots = _take(rows, layout.row_of_slot)  # [S, D]
    num_items = slots.shape[0] // slots_per_item
    return slots.reshape(num_items, slots_per_item, -1).sum(axis=1, dtype=jnp.float32).astype(rows.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def to_rows(x: jax.Array, layout: TileLayout, slots_per_item: int) -> jax.Array:
    """Rows ``[R, D]``: row r holds ``x[slot_of_row[r] // slots_per_item]`` (zeros on padding rows).

    ``slots_per_item`` is k for tokens routed to k experts (x holds tokens) and 1 when x already holds slots.
    Its transpose (and gradient) is ``combine_rows``.
    """
    return _gather_rows(x, layout, slots_per_item)


def _to_rows_fwd(x, layout, slots_per_item):
    return to_rows(x, layout, slots_per_item), (layout, x[:, :0])


def _to_rows_bwd(slots_per_item, res, d_rows):
    layout, x_type = res
    return like_primal(_sum_slots(d_rows, layout, slots_per_item), x_type), None


to_rows.defvjp(_to_rows_fwd, _to_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def combine_rows(rows: jax.Array, layout: TileLayout, slots_per_item: int) -> jax.Array:
    """Per item ``[S // slots_per_item, D]``: the sum of the rows of its slots (the MoE's combine; the routing
    weights are applied before W2, see ``moe.expert_swiglu``). The transpose of ``to_rows``: its gradient is one
    gather of the output gradient into the rows."""
    return _sum_slots(rows, layout, slots_per_item)


def _combine_rows_fwd(rows, layout, slots_per_item):
    return combine_rows(rows, layout, slots_per_item), (layout, rows[:, :0])


def _combine_rows_bwd(slots_per_item, res, dy):
    layout, rows_type = res
    return like_primal(_gather_rows(dy.astype(rows_type.dtype), layout, slots_per_item), rows_type), None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


@jax.custom_vjp
def from_rows(rows: jax.Array, layout: TileLayout) -> jax.Array:
    """Per-slot results ``[S, D]``: slot s reads ``rows[row_of_slot[s]]`` (zeros for a slot of no group)."""
    return _take(rows, layout.row_of_slot)


def _from_rows_fwd(rows, layout):
    return from_rows(rows, layout), (layout, rows[:, :0])


def _from_rows_bwd(res, d_slots):
    layout, rows_type = res
    return like_primal(_take(d_slots, layout.slot_of_row), rows_type), None


from_rows.defvjp(_from_rows_fwd, _from_rows_bwd)


def combine_slots(slot_out: jax.Array, weights: jax.Array) -> jax.Array:
    """Each token's k slot outputs (``[T*k, D]``, token-major) summed with its routing weights ``[T, k]``."""
    num_tokens, k = weights.shape
    # an elementwise product and sum (fused by XLA); as an einsum it becomes T batched 1 x k x D matmuls on GPU
    weighted = slot_out.reshape(num_tokens, k, -1) * weights.astype(slot_out.dtype)[:, :, None]
    return jnp.sum(weighted, axis=1, dtype=jnp.float32).astype(slot_out.dtype)
