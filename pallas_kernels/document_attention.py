"""Backward pass of causal softmax attention over packed documents, as two Pallas Mosaic GPU kernels (Hopper).

A query at position ``t`` sees the keys ``k_start[t] <= s <= t`` (``k_start``: where its document begins). The
forward pass of tokamax's flash attention skips the key blocks outside that range, but its backward kernels only
mask them, so they do the whole causal square: with ~4 documents per 8K row that is about 1.7x the work inside
the documents. These kernels bound their loops by the documents as well:

* ``dq`` (one CTA per 128 queries of one head): key blocks from the block holding the tile's first query's
  ``k_start`` up to the tile's last query (``k_start`` never decreases along a row);
* ``dk``/``dv`` (one CTA per 128 keys of one kv head, summing over the query heads that share it): query blocks
  from the tile's first key up to the end of the last key's document.

Blocks that straddle the diagonal or a document start are masked elementwise; the others skip the mask. Each CTA
has one producer warpgroup streaming blocks through shared memory with TMA and two consumer warpgroups (64 rows
each) running wgmma, the structure of FlashAttention-3's backward pass.

The inputs are the forward pass's output and its softmax statistics in tokamax's convention (``m``, ``l`` with
``p = exp(scale * q.k - m) / l``; here ``row_max``, ``row_sum``). ``document_attention_backward_reference`` is
the same function in ``jnp``. (Mosaic GPU's interpret mode takes no register operand for wgmma, so on CPU the
tests check the loop bounds, the block masks and the lowering; the kernels themselves are tested on a GPU.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped_matmul.mosaic_gpu import smem_transforms

BLOCK = 64  # rows per consumer warpgroup and per pipeline step, in both kernels
_TILE = 2 * BLOCK  # two consumer warpgroups per CTA
_STAGES = 2
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column


def fits(q: jax.Array, k: jax.Array) -> bool:
    """Whether the kernels take ``q [B, T, H, D]`` and ``k [B, T, Hkv, D]``: 16-bit, ``T`` a multiple of 128,
    ``D`` a multiple of 64 up to 256, whole query groups per kv head."""
    return (q.ndim == 4 and k.ndim == 4 and q.dtype == k.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[1] == k.shape[1] and q.shape[1] % _TILE == 0 and q.shape[3] == k.shape[3]
            and q.shape[3] % 64 == 0 and q.shape[3] <= 256 and q.shape[2] % k.shape[2] == 0)


def document_ends(k_start: jax.Array) -> jax.Array:
    """int32 ``[B, T]``: one past the last position of each position's document, from ``k_start [B, T]``."""
    seq = k_start.shape[1]
    positions = jnp.arange(seq, dtype=jnp.int32)
    starts_here = jnp.where(k_start == positions, positions, seq)  # seq where no document starts
    next_start = jnp.concatenate([starts_here[:, 1:], jnp.full_like(starts_here[:, :1], seq)], axis=1)
    return lax.cummin(next_start, axis=1, reverse=True)


def block_bounds(k_start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The kernels' loop bounds, int32 ``[B, T / 128]`` each: per query tile, the first key block (of ``BLOCK``)
    it sees; per key tile, one past the last query block that sees it."""
    seq = k_start.shape[1]
    first_key_block = k_start[:, ::_TILE] // BLOCK
    last_key_end = document_ends(k_start)[:, _TILE - 1::_TILE]
    return first_key_block.astype(jnp.int32), (-(-last_key_end // BLOCK)).astype(jnp.int32).clip(max=seq // BLOCK)


def _block_mask(values, query_axis, q_base, k_base, k_start, needs_mask):
    """``values`` (a ``BLOCK x BLOCK`` score-shaped block) with the entries outside ``k_start <= key <= query``
    zeroed; ``k_start`` holds the queries' values along ``query_axis``. Blocks with ``needs_mask`` False pass."""
    key_axis = 1 - query_axis

    def masked():
        queries = q_base + plgpu.broadcasted_iota(jnp.int32, values.shape, query_axis, layout=plgpu.Layout.WGMMA)
        keys = k_base + plgpu.broadcasted_iota(jnp.int32, values.shape, key_axis, layout=plgpu.Layout.WGMMA)
        starts = lax.broadcast_in_dim(k_start, values.shape, [query_axis])
        return jnp.where((keys <= queries) & (keys >= starts), values, 0.0)

    return lax.cond(needs_mask, masked, lambda: values)


def _needs_mask(q_base, k_base, last_k_start):
    """Whether a query block at ``q_base`` and key block at ``k_base`` has entries outside the documents: it
    reaches past the diagonal, or the block's last query (the largest ``k_start``) starts after its first key."""
    return (k_base + BLOCK > q_base + 1) | (last_k_start > k_base)


def _dq_kernel(first_key_block_gmem, k_start_gmem, q_gmem, k_gmem, v_gmem, do_gmem, lse2_gmem, delta_gmem,
               dq_gmem, q_smems, do_smems, barriers, *, group, scale):
    head, tile, batch = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    kv_head = lax.div(head, jnp.array(group, head.dtype))
    q_base = tile * _TILE + wg * BLOCK
    rows = pl.ds(q_base, BLOCK)
    first = first_key_block_gmem[batch, tile]
    end = (tile + 1) * (_TILE // BLOCK)  # causal: the key blocks up to the tile's last query
    q_smem, do_smem = q_smems.at[wg], do_smems.at[wg]
    dtype = q_gmem.dtype
    transforms = smem_transforms(q_gmem.shape[-1] * 2)

    def compute(run_pipeline):
        barrier = barriers.at[wg]
        plgpu.copy_gmem_to_smem(q_gmem.at[batch, rows, head], q_smem, barrier)
        plgpu.copy_gmem_to_smem(do_gmem.at[batch, rows, head], do_smem, barrier)
        lse2 = plgpu.load(lse2_gmem.at[batch, head, rows], layout=_ROW, optimized=False)
        delta = plgpu.load(delta_gmem.at[batch, head, rows], layout=_ROW, optimized=False)
        k_start = plgpu.load(k_start_gmem.at[batch, rows], layout=_ROW, optimized=False)
        last_k_start = k_start_gmem[batch, q_base + BLOCK - 1]
        plgpu.barrier_wait(barrier)

        def accumulate(dq_acc):
            run_pipeline((dq_acc, lse2, delta, k_start, last_k_start))
            return dq_acc[...]

        dq = pl.run_scoped(accumulate, plgpu.ACC(q_smem.shape, jnp.float32))
        q_smem[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_gmem.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def key_step(index, k_smem, v_smem, k_consumed, v_consumed, carry):
        dq_acc, lse2, delta, k_start, last_k_start = carry
        k_base = (first + index[0]) * BLOCK

        def scores(s_acc, dp_acc):
            plgpu.wgmma(s_acc, q_smem, k_smem.T)
            plgpu.wgmma(dp_acc, do_smem, v_smem.T)
            return s_acc[...], dp_acc[...]

        s, dp = pl.run_scoped(scores, *(plgpu.ACC((BLOCK, BLOCK), jnp.float32),) * 2)
        plgpu.barrier_arrive(v_consumed)
        p = jnp.exp2(s * (scale * math.log2(math.e)) - lax.broadcast_in_dim(lse2, s.shape, [0]))
        p = _block_mask(p, 0, q_base, k_base, k_start, _needs_mask(q_base, k_base, last_k_start))
        ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
        plgpu.wgmma(dq_acc, ds.astype(dtype), k_smem)
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(k_consumed)
        return carry

    head_dim = q_gmem.shape[-1]
    kv_spec = plgpu.BlockSpec((BLOCK, head_dim), lambda i: (first + i, 0), transforms=transforms)
    plgpu.emit_pipeline_warp_specialized(
        key_step, grid=(end - first,), max_concurrent_steps=_STAGES, num_compute_wgs=2, memory_registers=40,
        wg_axis="wg", manual_consumed_barriers=True, compute_context=compute, in_specs=[kv_spec, kv_spec],
    )(k_gmem.at[batch, :, kv_head], v_gmem.at[batch, :, kv_head])


def _dkv_kernel(query_block_end_gmem, k_start_gmem, q_gmem, k_gmem, v_gmem, do_gmem, lse2_gmem, delta_gmem,
                dk_gmem, dv_gmem, k_smems, v_smems, barriers, *, group, scale):
    kv_head, tile, batch = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    k_base = tile * _TILE + wg * BLOCK
    keys = pl.ds(k_base, BLOCK)
    first = tile * (_TILE // BLOCK)  # causal: the query blocks from the tile's first key on
    end = query_block_end_gmem[batch, tile]
    k_smem, v_smem = k_smems.at[wg], v_smems.at[wg]
    dtype = k_gmem.dtype
    head_dim = q_gmem.shape[-1]
    transforms = smem_transforms(head_dim * 2)

    def compute(run_pipeline):
        barrier = barriers.at[wg]
        plgpu.copy_gmem_to_smem(k_gmem.at[batch, keys, kv_head], k_smem, barrier)
        plgpu.copy_gmem_to_smem(v_gmem.at[batch, keys, kv_head], v_smem, barrier)
        plgpu.barrier_wait(barrier)

        def accumulate(dk_acc, dv_acc):
            run_pipeline((dk_acc, dv_acc))
            return dk_acc[...], dv_acc[...]

        acc = plgpu.ACC(k_smem.shape, jnp.float32)
        dk, dv = pl.run_scoped(accumulate, acc, acc)
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_gmem.at[batch, keys, kv_head], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, dv_gmem.at[batch, keys, kv_head], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def query_step(index, q_smem, do_smem, lse2_smem, delta_smem, k_start_smem, q_consumed, do_consumed,
                   lse2_consumed, delta_consumed, k_start_consumed, carry):
        dk_acc, dv_acc = carry
        q_base = (first + index[0]) * BLOCK

        def scores(s_acc):
            plgpu.wgmma(s_acc, k_smem, q_smem.T)
            return s_acc[...]

        s = pl.run_scoped(scores, plgpu.ACC((BLOCK, BLOCK), jnp.float32))  # [keys, queries]
        lse2 = plgpu.load(lse2_smem, layout=_COL)
        delta = plgpu.load(delta_smem, layout=_COL)
        k_start = plgpu.load(k_start_smem, layout=_COL)
        for consumed in (lse2_consumed, delta_consumed, k_start_consumed):
            plgpu.barrier_arrive(consumed)
        last_k_start = k_start_gmem[batch, q_base + BLOCK - 1]
        p = jnp.exp2(s * (scale * math.log2(math.e)) - lax.broadcast_in_dim(lse2, s.shape, [1]))
        p = _block_mask(p, 1, q_base, k_base, k_start, _needs_mask(q_base, k_base, last_k_start))

        def value_grads(dp_acc):
            plgpu.wgmma(dv_acc, p.astype(dtype), do_smem)
            plgpu.wgmma(dp_acc, v_smem, do_smem.T)
            return dp_acc[...]

        dp = pl.run_scoped(value_grads, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
        plgpu.barrier_arrive(do_consumed)
        ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [1]))
        plgpu.wgmma(dk_acc, ds.astype(dtype), q_smem)
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(q_consumed)
        return carry

    def heads_of(index_map):  # step (i, j): query block first + i of query head j of this kv head's group
        return lambda i, j: index_map(first + i, kv_head * group + j)

    row_spec = plgpu.BlockSpec((BLOCK, None, head_dim), heads_of(lambda qb, h: (qb, h, 0)), transforms=transforms)
    stat_spec = plgpu.BlockSpec((None, BLOCK), heads_of(lambda qb, h: (h, qb)))
    start_spec = plgpu.BlockSpec((BLOCK,), lambda i, j: (first + i,))
    plgpu.emit_pipeline_warp_specialized(
        query_step, grid=(end - first, group), max_concurrent_steps=_STAGES, num_compute_wgs=2,
        memory_registers=40, wg_axis="wg", manual_consumed_barriers=True, compute_context=compute,
        in_specs=[row_spec, row_spec, stat_spec, stat_spec, start_spec],
    )(q_gmem.at[batch], do_gmem.at[batch], lse2_gmem.at[batch], delta_gmem.at[batch], k_start_gmem.at[batch])


def _scratch(shape, dtype):
    return plgpu.SMEM((2, *shape), dtype, transforms=smem_transforms(shape[-1] * 2))


def _statistics(out, d_out, row_max, row_sum):
    """``log2`` of each row's softmax normalizer and ``delta = sum(out * d_out)``, fp32 ``[B, H, T]``."""
    lse2 = (row_max + jnp.log(row_sum)) * math.log2(math.e)
    delta = jnp.einsum("bthd,bthd->bht", out, d_out, preferred_element_type=jnp.float32)
    return lse2.astype(jnp.float32), delta


@functools.partial(jax.jit, static_argnames=("logits_scale",))
def document_attention_backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, d_out: jax.Array,
                                row_max: jax.Array, row_sum: jax.Array, k_start: jax.Array, *, logits_scale: float
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dv)`` of ``out = attention(q, k, v)`` for the cotangent ``d_out`` (Hopper GPUs only).

    Args:
      q, out, d_out: ``[B, T, H, D]``; k, v: ``[B, T, Hkv, D]`` (query head h reads kv head ``h // (H / Hkv)``),
        16-bit (see ``fits``).
      row_max, row_sum: fp32 ``[B, H, T]``, the forward pass's softmax statistics (tokamax's ``m`` and ``l``:
        ``p = exp(logits_scale * q.k - row_max) / row_sum``).
      k_start: int32 ``[B, T]``, the first key each query sees (non-decreasing along a row, ``<= t``).
    """
    if not fits(q, k) or v.shape != k.shape or out.shape != q.shape or d_out.shape != q.shape:
        raise ValueError(f"document_attention_backward: q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, v {v.shape}, "
                         f"out {out.shape}, d_out {d_out.shape}: need 16-bit q/k/v, T a multiple of {_TILE}, "
                         "head_dim a multiple of 64 up to 256, heads a multiple of kv heads")
    stats_shape = (q.shape[0], q.shape[2], q.shape[1])
    if row_max.shape != stats_shape or row_sum.shape != stats_shape or k_start.shape != q.shape[:2]:
        raise ValueError(f"document_attention_backward: row_max {row_max.shape}, row_sum {row_sum.shape} must be "
                         f"[B, H, T] = {stats_shape} and k_start {k_start.shape} [B, T]")
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    k_start = k_start.astype(jnp.int32)
    first_key_block, query_block_end = block_bounds(k_start)
    lse2, delta = _statistics(out, d_out, row_max, row_sum)
    d_out = d_out.astype(q.dtype)
    params = plgpu.CompilerParams(approx_math=True)
    common = dict(grid_names=("heads", "tiles", "batch"), num_threads=3, thread_name="wg", compiler_params=params)
    rows = _scratch((BLOCK, head_dim), q.dtype)
    barriers = plgpu.Barrier(num_barriers=2, num_arrivals=2)
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, group=group, scale=logits_scale),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), scratch_types=[rows, rows, barriers],
        grid=(heads, seq // _TILE, batch), **common,
    )(first_key_block, k_start, q, k, v, d_out, lse2, delta)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, group=group, scale=logits_scale),
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),) * 2, scratch_types=[rows, rows, barriers],
        grid=(kv_heads, seq // _TILE, batch), **common,
    )(query_block_end, k_start, q, k, v, d_out, lse2, delta)
    return dq, dk, dv


def document_attention_backward_reference(q, k, v, out, d_out, row_max, row_sum, k_start, *, logits_scale):
    """``document_attention_backward`` in ``jnp`` (fp32 math, dense masks): for tests."""
    group = q.shape[2] // k.shape[2]
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    q, k, v, out, d_out = map(f32, (q, k, v, out, d_out))
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    seq = q.shape[1]
    positions = jnp.arange(seq)
    visible = (positions[None, :] <= positions[:, None])[None] & (positions[None, None, :] >= k_start[:, :, None])
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * logits_scale
    p = jnp.where(visible[:, None], jnp.exp(logits - row_max[..., None]) / row_sum[..., None], 0.0)
    dp = jnp.einsum("bthd,bshd->bhts", d_out, v)
    delta = jnp.einsum("bthd,bthd->bht", out, d_out)
    ds = p * (dp - delta[..., None]) * logits_scale
    dq = jnp.einsum("bhts,bshd->bthd", ds, k)
    dk = jnp.einsum("bhts,bthd->bshd", ds, q)
    dv = jnp.einsum("bhts,bthd->bshd", p, d_out)
    kv_shape = (*dk.shape[:2], dk.shape[2] // group, group, dk.shape[3])
    return dq, dk.reshape(kv_shape).sum(3), dv.reshape(kv_shape).sum(3)
