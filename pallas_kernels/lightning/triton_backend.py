"""Triton backend (``ops.py`` contract): chunk states in Pallas, a closed-form decayed prefix over chunks in JAX,
then all outputs (or gradients) in Pallas, in parallel over (batch x heads, chunks, column tiles).

Forward:  ``U = chunk_states(K, V)``; ``x = coef @ [S0, U_0, .., U_{N-1}]`` gives the state entering each chunk
and the final state; ``O = chunk_outputs(Q, K, V, x)``.
Backward: states again (recomputed, not stored); ``W = chunk_states(Q, dO, reverse)``;
``z = coef^T @ [W_0, .., W_{N-1}, dS_final]`` gives the state gradient at each chunk boundary (``z_0`` is
dS0); then dQ, dK, dV from three ``chunk_outputs`` calls (see ``triton_kernels.py``).
``coef[c, j] = prod_{m=j}^{c-1} G_m`` with ``G_m = exp(-s len_m)`` if chunk m is one segment continuing the
previous one, else 0: an ``(N+1) x (N+1)`` matrix per (batch, head), cheap for the few chunks used here.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from pallas_kernels.lightning import triton_kernels as tk

DEFAULT_BLOCK_SIZE = 64
# Launch shape knobs of the forward and the backward pass, read at trace time (scripts/bench_lightning.py --tune
# sweeps them): programs to aim for (4 per H100 multiprocessor: 528 beat 1056 by 10-25% at batch 1 x 16K and 64K
# and at the small preset's 8 x 8K x 8 heads, docs/benchmarks.md), fewest blocks per chunk (one-block chunks make
# the O(chunks^2) state combine dominate short sequences), widest column tile, Triton warps and stages.
TUNING = {
    "fwd": {"target_programs": 528, "min_chunk_blocks": 4, "max_tile": 128, "num_warps": 8, "num_stages": 3},
    "bwd": {"target_programs": 528, "min_chunk_blocks": 4, "max_tile": 128, "num_warps": 8, "num_stages": 3},
}
# fp32 operands take twice the shared memory: narrower tiles, fewer stages (128 x 3 stages overflows 227 KiB).
_FP32_LIMITS = {"max_tile": 64, "num_stages": 2}


def _knobs(name, dtype):
    knobs = dict(TUNING[name])
    if jnp.dtype(dtype).itemsize >= 4:
        knobs = {k: min(v, _FP32_LIMITS.get(k, v)) for k, v in knobs.items()}
    return knobs


def _plan(b, t, h, d, block, knobs):
    """Column tile, blocks per chunk and number of chunks: enough programs to fill the GPU, few chunks."""
    if d < 16 or d & (d - 1):
        raise ValueError(f"triton backend: head_dim must be a power of two >= 16, got {d}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"triton backend: block_size must be a power of two >= 16, got {block}")
    tile = min(d, knobs["max_tile"])
    n_blocks = t // block
    max_chunks = max(1, n_blocks // knobs["min_chunk_blocks"])
    n_chunks = max(1, min(max_chunks, math.ceil(knobs["target_programs"] / (b * h * (d // tile)))))
    chunk_blocks = math.ceil(n_blocks / n_chunks)
    return tile, chunk_blocks, math.ceil(n_blocks / chunk_blocks)


def _launch(knobs):
    return {"num_warps": knobs["num_warps"], "num_stages": knobs["num_stages"]}


def _prev_blk(seg, block):
    """Segment index of the position before each block, 0 for the first: int32 ``[batch, blocks]``."""
    before = seg[:, block - 1 :: block][:, :-1]
    return jnp.concatenate([jnp.zeros_like(seg[:, :1]), before], axis=1)


def _coef(seg, prev_blk, decay, block, chunk_blocks, n_chunks):
    """``coef[b, h, c, j] = prod_{m=j}^{c-1} G_m`` for ``j <= c`` (else 0), fp32 ``[B, H, N+1, N+1]``."""
    t = seg.shape[1]
    starts = jnp.minimum(jnp.arange(n_chunks + 1) * (chunk_blocks * block), t)  # chunk starts, then t
    prev_c = prev_blk[:, starts[:-1] // block]  # [B, N]
    last_c = seg[:, starts[1:] - 1]
    dead = (last_c != prev_c).astype(jnp.int32)
    dead_cum = jnp.concatenate([jnp.zeros_like(dead[:, :1]), jnp.cumsum(dead, axis=1)], axis=1)  # [B, N+1]
    span = (starts[:, None] - starts[None, :]).astype(jnp.float32)  # [N+1, N+1]: start_c - start_j
    ok = (span >= 0)[None] & (dead_cum[:, :, None] == dead_cum[:, None, :])  # [B, N+1, N+1]
    decayed = jnp.exp(-decay[:, None, None] * jnp.maximum(span, 0.0))  # [H, N+1, N+1]
    return jnp.where(ok[:, None], decayed[None], 0.0)


def _states(k, v, decay, seg, prev_blk, initial_state, block, tile, chunk_blocks, n_chunks, interpret, knobs):
    """States at chunk boundaries ``x`` ``[B, H, N+1, D, D]``: x[:, :, c] enters chunk c, x[:, :, N] is final."""
    u = tk.chunk_states(decay, seg, prev_blk, k, v, block=block, chunk_blocks=chunk_blocks, tile=tile,
                        reverse=False, interpret=interpret, **_launch(knobs))
    y = jnp.concatenate([initial_state[:, :, None], u], axis=2)
    coef = _coef(seg, prev_blk, decay, block, chunk_blocks, n_chunks)
    return jnp.einsum("bhcj,bhjde->bhcde", coef, y, precision=lax.Precision.HIGHEST), coef


def forward(q, k, v, decay, segment_ids, initial_state, *, block_size, interpret=False):
    """``(o, final_state)`` for ``T`` a multiple of ``block_size`` (contract in ``ops.py``)."""
    b, t, h, d = q.shape
    knobs = _knobs("fwd", q.dtype)
    tile, chunk_blocks, n_chunks = _plan(b, t, h, d, block_size, knobs)
    seg = segment_ids.astype(jnp.int32)
    prev_blk = _prev_blk(seg, block_size)
    x, _ = _states(k, v, decay, seg, prev_blk, initial_state, block_size, tile, chunk_blocks, n_chunks, interpret,
                   knobs)
    o = tk.chunk_outputs(decay, seg, prev_blk, q, k, v, x, block=block_size,
                         chunk_blocks=chunk_blocks, tile=tile, reverse=False, state_t=False, interpret=interpret,
                         **_launch(knobs))
    return o, x[:, :, n_chunks]


def backward(q, k, v, decay, segment_ids, initial_state, do, dfinal_state, *, block_size, interpret=False):
    """``(dq, dk, dv, dinitial_state)`` (contract in ``ops.py``); states are recomputed, not stored."""
    b, t, h, d = q.shape
    knobs = _knobs("bwd", q.dtype)
    tile, chunk_blocks, n_chunks = _plan(b, t, h, d, block_size, knobs)
    seg = segment_ids.astype(jnp.int32)
    prev_blk = _prev_blk(seg, block_size)
    x, coef = _states(k, v, decay, seg, prev_blk, initial_state, block_size, tile, chunk_blocks, n_chunks,
                      interpret, knobs)
    w = tk.chunk_states(decay, seg, prev_blk, q, do, block=block_size, chunk_blocks=chunk_blocks, tile=tile,
                        reverse=True, interpret=interpret, **_launch(knobs))
    y = jnp.concatenate([w, dfinal_state[:, :, None]], axis=2)
    z = jnp.einsum("bhjc,bhjde->bhcde", coef, y, precision=lax.Precision.HIGHEST)  # z[:, :, c] = dL/dx_c
    kw = dict(block=block_size, chunk_blocks=chunk_blocks, tile=tile, interpret=interpret, **_launch(knobs))
    dq = tk.chunk_outputs(decay, seg, prev_blk, do, v, k, x, reverse=False, state_t=True, **kw)
    # chunk c reads z[:, :, c + 1], the gradient of the state leaving it
    dk = tk.chunk_outputs(decay, seg, prev_blk, v, do, q, z, reverse=True, state_t=True, state_offset=1, **kw)
    dv = tk.chunk_outputs(decay, seg, prev_blk, k, q, do, z, reverse=True, state_t=False, state_offset=1, **kw)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), z[:, :, 0]


