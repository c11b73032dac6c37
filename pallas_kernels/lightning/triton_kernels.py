"""Pallas-Triton kernels of chunked lightning attention (GPU; CPU through ``interpret=True``).

Two kernels serve the forward and the backward pass. The sequence is cut into blocks of ``block`` positions and
blocks into "chunks" of ``chunk_blocks`` blocks; one program owns (batch x head, chunk, column tile) and loops over
its chunk's blocks with a running fp32 ``[D, tile]`` state in registers, so states never go through HBM except
one per chunk. Positions carry a normalized segment index (``ops.py``), ``prev_blk[b, n]`` is the index of the
position before block ``n`` (0 for the first block).

* ``chunk_states``: per chunk ``U = sum_j w_j B_j^T C_j`` with ``w_j = exp(-s * dist_j)`` on the positions of the
  chunk's last segment (forward, ``dist`` = steps to the chunk's last position) or on those that continue the segment
  alive before the chunk (``reverse``, ``dist`` = steps from the position before the chunk). Forward on (K, V) gives
  the state a chunk adds; reverse on (Q, dO) gives the state gradient a chunk's outputs produce.
* ``chunk_outputs``: ``out_i = sum_{j <= i, same segment} exp(-s (i-j)) (A_i . B_j) C_j + A_i S`` (decayed state
  term for positions alive since the state) with the state carried block to block; ``reverse`` runs blocks and
  positions backwards (``j >= i``). With (A, B, C) = (Q, K, V) this is the output; (dO, V, K) with S^T gives dQ;
  reversed, (K, Q, dO) gives dV and (V, dO, Q) with dS^T gives dK.
Only non-positive exponents appear. Matmuls take operands in ``mm_dtype`` and accumulate in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32


def _dot(a, b, *, trans_a=False, trans_b=False):
    """fp32-accumulating 2-D matmul; fp32 operands use IEEE fp32 (Triton's default for them is TF32)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    # explicit either way, so a global jax_default_matmul_precision cannot change the kernel
    precision = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _program(heads):
    bh, c, vt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    return bh // heads, bh % heads, c, vt


def _state_kernel(decay_ref, seg_ref, prev_ref, b_ref, c_ref, out_ref, *, heads, block, chunk_blocks, seq, tile,
                  reverse, mm_dtype):
    b, h, c, vt = _program(heads)
    s = decay_ref[h]
    start = c * (chunk_blocks * block)
    nblk = jnp.minimum(chunk_blocks, (seq - start) // block)
    end = start + nblk * block
    ref_idx = prev_ref[b, start // block] if reverse else seg_ref[b, end - 1]
    r = lax.broadcasted_iota(jnp.int32, (block,), 0)
    d = b_ref.shape[-1]

    def body(i, acc):
        t0 = start + i * block
        bm = b_ref[b, pl.ds(t0, block), h, :].astype(F32)
        cv = c_ref[b, pl.ds(t0, block), h, pl.ds(vt * tile, tile)].astype(mm_dtype)
        idx = seg_ref[b, pl.ds(t0, block)]
        dist = (t0 + r - start + 1) if reverse else (end - 1 - t0 - r)
        w = jnp.where(idx == ref_idx, jnp.exp(-s * dist.astype(F32)), 0.0)
        return acc + _dot((bm * w[:, None]).astype(mm_dtype), cv, trans_a=True)

    acc = lax.fori_loop(0, nblk, body, jnp.zeros((d, tile), F32))
    out_ref[b, h, c, :, pl.ds(vt * tile, tile)] = acc


def _output_kernel(decay_ref, seg_ref, prev_ref, a_ref, b_ref, c_ref, state_ref, out_ref, *, heads, block,
                   chunk_blocks, seq, tile, reverse, state_t, state_offset, mm_dtype):
    b, h, c, vt = _program(heads)
    s = decay_ref[h]
    start = c * (chunk_blocks * block)
    nblk = jnp.minimum(chunk_blocks, (seq - start) // block)
    if state_t:
        state = state_ref[b, h, c + state_offset, pl.ds(vt * tile, tile), :].T
    else:
        state = state_ref[b, h, c + state_offset, :, pl.ds(vt * tile, tile)]
    r = lax.broadcasted_iota(jnp.int32, (block,), 0)
    ri = lax.broadcasted_iota(jnp.int32, (block, block), 0)
    rj = lax.broadcasted_iota(jnp.int32, (block, block), 1)
    diff = (rj - ri) if reverse else (ri - rj)  # output row i, source j
    mask = jnp.where(diff >= 0, jnp.exp(-s * jnp.maximum(diff, 0).astype(F32)), 0.0)
    early = jnp.exp(-s * (r + 1).astype(F32))  # decay from the state before the block to position r
    late = jnp.exp(-s * (block - 1 - r).astype(F32))  # decay from position r to the block's last position
    inter_dec, upd_dec = (late, early) if reverse else (early, late)
    g_full = jnp.exp(-s * block)

    def body(i, st):
        k = (nblk - 1 - i) if reverse else i
        t0 = start + k * block
        a = a_ref[b, pl.ds(t0, block), h, :]
        bm = b_ref[b, pl.ds(t0, block), h, :]
        cv = c_ref[b, pl.ds(t0, block), h, pl.ds(vt * tile, tile)].astype(mm_dtype)
        idx = seg_ref[b, pl.ds(t0, block)]
        prev = prev_ref[b, t0 // block]
        last = jnp.max(idx)
        st_idx, up_idx = (last, prev) if reverse else (prev, last)
        scores = _dot(a.astype(mm_dtype), bm.astype(mm_dtype), trans_b=True)
        p = jnp.where(idx[:, None] == idx[None, :], scores * mask, 0.0)
        out = _dot(p.astype(mm_dtype), cv)
        aw = a.astype(F32) * jnp.where(idx == st_idx, inter_dec, 0.0)[:, None]
        out = out + _dot(aw.astype(mm_dtype), st.astype(mm_dtype))
        out_ref[b, pl.ds(t0, block), h, pl.ds(vt * tile, tile)] = out.astype(out_ref.dtype)
        g = jnp.where(last == prev, g_full, 0.0)
        bw = bm.astype(F32) * jnp.where(idx == up_idx, upd_dec, 0.0)[:, None]
        return g * st + _dot(bw.astype(mm_dtype), cv, trans_a=True)

    lax.fori_loop(0, nblk, body, state)


def _params(num_warps, num_stages):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("block", "chunk_blocks", "tile", "reverse", "interpret",
                                             "num_warps", "num_stages"))
def chunk_states(decay, seg, prev_blk, bmat, cmat, *, block, chunk_blocks, tile, reverse, interpret=False,
                 num_warps=4, num_stages=2):
    """Per-chunk weighted ``B^T C`` sums, fp32 ``[batch, heads, chunks, D, D]`` (see the module docstring)."""
    b, t, h, d = bmat.shape
    n_chunks = pl.cdiv(t // block, chunk_blocks)
    mm_dtype = F32 if interpret else bmat.dtype
    kernel = functools.partial(_state_kernel, heads=h, block=block, chunk_blocks=chunk_blocks, seq=t, tile=tile,
                               reverse=reverse, mm_dtype=mm_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, h, n_chunks, d, d), F32),
        grid=(b * h, n_chunks, d // tile),
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="lightning_chunk_states_rev" if reverse else "lightning_chunk_states",
    )(decay, seg, prev_blk, bmat, cmat)


@functools.partial(jax.jit, static_argnames=("block", "chunk_blocks", "tile", "reverse", "state_t", "state_offset",
                                             "interpret", "num_warps", "num_stages"))
def chunk_outputs(decay, seg, prev_blk, amat, bmat, cmat, states, *, block, chunk_blocks, tile, reverse, state_t,
                  state_offset=0, interpret=False, num_warps=4, num_stages=2):
    """Outputs ``[batch, seq, heads, D]`` (dtype of ``amat``) from per-chunk entering states (module docstring):
    chunk ``c`` reads ``states[:, :, c + state_offset]`` (an offset instead of a sliced copy of the states)."""
    b, t, h, d = amat.shape
    n_chunks = pl.cdiv(t // block, chunk_blocks)
    mm_dtype = F32 if interpret else amat.dtype
    kernel = functools.partial(_output_kernel, heads=h, block=block, chunk_blocks=chunk_blocks, seq=t, tile=tile,
                               reverse=reverse, state_t=state_t, state_offset=state_offset, mm_dtype=mm_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, t, h, d), amat.dtype),
        grid=(b * h, n_chunks, d // tile),
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="lightning_chunk_outputs_rev" if reverse else "lightning_chunk_outputs",
    )(decay, seg, prev_blk, amat, bmat, cmat, states)
