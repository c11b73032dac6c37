"""Tile-aligned MoE dispatch: every slot gets its own row inside its group's tiles; to_rows/from_rows and their
custom gradients equal plain gathers differentiated by JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.model.moe_dispatch import (
    combine_rows,
    combine_slots,
    from_rows,
    num_layout_rows,
    tile_layout,
    to_rows,
)


@pytest.mark.parametrize("groups, num_groups, tile", [
    ([2, 0, 2, 2, 0, 3, 2], 4, 4),  # group 1 empty
    ([1, 1, 1, 1, 1], 2, 2),  # group 0 empty
    ([0, 3, 1, 3, 3, 0], 3, 8),  # 3 = no group (two slots)
    ([5, 5], 5, 4),  # nothing assigned
    ([255, 0, 254, 255, 0], 255, 2),  # uint8 sort keys: 255 = no group still sorts last
    ([300, 256, 0, 299, 256, 300], 300, 2),  # more groups than uint8 holds: uint16 keys
])
def test_layout_places_each_slot_once_in_its_groups_tiles(groups, num_groups, tile):
    layout = tile_layout(jnp.asarray(groups), num_groups, tile)
    row_of_slot, slot_of_row = np.asarray(layout.row_of_slot), np.asarray(layout.slot_of_row)
    tile_group = np.asarray(layout.tile_group)
    num_rows, num_slots = num_layout_rows(len(groups), num_groups, tile), len(groups)
    assert slot_of_row.shape == (num_rows,) and tile_group.shape == (num_rows // tile,)
    assert np.all(np.diff(tile_group) >= 0)
    for slot, group in enumerate(groups):
        row = row_of_slot[slot]
        if group == num_groups:
            assert row == num_rows  # belongs nowhere: reads zeros
            continue
        assert slot_of_row[row] == slot and tile_group[row // tile] == group
    assigned = [s for s, g in enumerate(groups) if g < num_groups]
    assert sorted(slot_of_row[slot_of_row < num_slots].tolist()) == assigned
    # slots of one group keep their order; tiles hold one group; unused tiles come last
    for group in range(num_groups):
        rows = [row_of_slot[s] for s, g in enumerate(groups) if g == group]
        assert rows == sorted(rows)
        tiles = np.flatnonzero(tile_group == group)
        assert len(tiles) == -(-len(rows) // tile)


def _plain_to_rows(x, slot_of_row, k):
    return jnp.take(x, slot_of_row // k, axis=0, mode="fill", fill_value=0)


def _plain_from_rows(rows, row_of_slot):
    return jnp.take(rows, row_of_slot, axis=0, mode="fill", fill_value=0)


@pytest.mark.parametrize("k, dtype, width", [
    (1, jnp.float32, 5),
    (2, jnp.float32, 5),
    (2, jnp.bfloat16, 6),  # 16-bit rows gathered as packed uint32 pairs
    (2, jnp.bfloat16, 5),  # odd width: element by element
])
def test_to_rows_and_from_rows_equal_plain_gathers_with_gradients(k, dtype, width):
    rng = np.random.default_rng(k)
    tokens, num_groups, tile = 7, 3, 4
    groups = jnp.asarray(rng.integers(0, num_groups, tokens * k))
    layout = tile_layout(groups, num_groups, tile)
    x = jnp.asarray(rng.standard_normal((tokens, width)), dtype)
    rows_ct = jnp.asarray(rng.standard_normal((num_layout_rows(tokens * k, num_groups, tile), width)), dtype)
    slots_ct = jnp.asarray(rng.standard_normal((tokens * k, width)), dtype)

    rows, vjp = jax.vjp(lambda a: to_rows(a, layout, k), x)
    want, want_vjp = jax.vjp(lambda a: _plain_to_rows(a, layout.slot_of_row, k), x)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(vjp(rows_ct)[0], want_vjp(rows_ct)[0], rtol=1e-6)

    back, vjp = jax.vjp(lambda r: from_rows(r, layout), rows_ct)
    want, want_vjp = jax.vjp(lambda r: _plain_from_rows(r, layout.row_of_slot), rows_ct)
    np.testing.assert_array_equal(back, want)
    np.testing.assert_array_equal(vjp(slots_ct)[0], want_vjp(slots_ct)[0])
    # the round trip returns every slot's row: token s // k
    np.testing.assert_array_equal(from_rows(to_rows(x, layout, k), layout), jnp.repeat(x, k, axis=0))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_combine_rows_sums_each_tokens_rows_and_is_the_transpose_of_to_rows(dtype, tol):
    """Uneven loads with an empty group (padding rows inside and after groups): each token's k rows summed, the
    gradient equals autodiff of gather-then-sum, and <to_rows(x), r> = <x, combine_rows(r)>."""
    rng = np.random.default_rng(3)
    tokens, k, num_groups, tile, width = 9, 2, 4, 4, 6
    groups = jnp.asarray(rng.choice([0, 1, 3], tokens * k))  # group 2 gets nothing
    layout = tile_layout(groups, num_groups, tile)
    rows = jnp.asarray(rng.standard_normal((num_layout_rows(tokens * k, num_groups, tile), width)), dtype)
    dy = jnp.asarray(rng.standard_normal((tokens, width)), dtype)

    got, got_vjp = jax.vjp(lambda r: combine_rows(r, layout, k), rows)
    want, want_vjp = jax.vjp(lambda r: combine_slots(from_rows(r, layout), jnp.ones((tokens, k))), rows)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    (g,), (w,) = got_vjp(dy), want_vjp(dy)
    assert g.dtype == w.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    x = jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)
    rows32 = rows.astype(jnp.float32)
    assert float(jnp.vdot(to_rows(x, layout, k), rows32)) == pytest.approx(
        float(jnp.vdot(x, combine_rows(rows32, layout, k))), rel=1e-5)
