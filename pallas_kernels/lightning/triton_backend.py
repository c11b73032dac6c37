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
# sweeps them): programs to aim for (a few per H100 multiprocessor), fewest blocks per chunk (one-block chunks make
# the O(chunks^2) state combine dominate short sequences), widest column tile, Triton warps and stages.
TUNING = {
    "fwd": {"target_programs": 1056, "min_chunk_blocks": 4, "max_tile": 128, "num_warps": 8, "num_stages": 3},
    "bwd": {"target_programs": 1056, "min_chunk_blocks": 4, "max_tile": 128, "num_warps": 8, "num_stages": 3},
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


def _states(k, v, decay, seg, prev_blk, initial_state, block, tile, chunk_blocks, n_chunks, interpret, knobs,
            head_dim, k_op, v_op):
    """States at chunk boundaries ``x`` ``[B, H, N+1, D, D]``: x[:, :, c] enters chunk c, x[:, :, N] is final."""
    u = tk.chunk_states(decay, seg, prev_blk, k, v, block=block, chunk_blocks=chunk_blocks, tile=tile,
                        reverse=False, interpret=interpret, head_dim=head_dim, b_op=k_op, c_op=v_op,
                        **_launch(knobs))
    y = jnp.concatenate([initial_state[:, :, None], u], axis=2)
    coef = _coef(seg, prev_blk, decay, block, chunk_blocks, n_chunks)
    return jnp.einsum("bhcj,bhjde->bhcde", coef, y, precision=lax.Precision.HIGHEST), coef


def forward(q, k, v, decay, segment_ids, initial_state, *, block_size, interpret=False,
            operands=(tk.PLAIN,) * 3):
    """``(o, final_state)`` for ``T`` a multiple of ``block_size`` (contract in ``ops.py``).

    ``operands`` (``triton_kernels.Operand``) locate q, k and v in their arrays, which may then be one packed
    projection ``[B, T, H, n D]`` read with SiLU (``forward_packed``); D is the initial state's last axis."""
    b, t, h = q.shape[:3]
    d = initial_state.shape[-1]
    knobs = _knobs("fwd", q.dtype)
    tile, chunk_blocks, n_chunks = _plan(b, t, h, d, block_size, knobs)
    seg = segment_ids.astype(jnp.int32)
    prev_blk = _prev_blk(seg, block_size)
    x, _ = _states(k, v, decay, seg, prev_blk, initial_state, block_size, tile, chunk_blocks, n_chunks, interpret,
                   knobs, d, operands[1], operands[2])
    o = tk.chunk_outputs(decay, seg, prev_blk, q, k, v, x, block=block_size,
                         chunk_blocks=chunk_blocks, tile=tile, reverse=False, state_t=False, interpret=interpret,
                         operands=operands, **_launch(knobs))
    return o, x[:, :, n_chunks]


def backward(q, k, v, decay, segment_ids, initial_state, do, dfinal_state, *, block_size, interpret=False,
             operands=(tk.PLAIN,) * 3):
    """``(dq, dk, dv, dinitial_state)`` (contract in ``ops.py``); states are recomputed, not stored.

    With SiLU ``operands`` (one packed projection, see ``forward``) it returns ``(dproj, dinitial_state)``
    instead: the gradients of the three pre-activations, each written in place at its operand's columns of one
    array shaped like the projection (its other columns are left unwritten)."""
    b, t, h = q.shape[:3]
    d = initial_state.shape[-1]
    knobs = _knobs("bwd", q.dtype)
    tile, chunk_blocks, n_chunks = _plan(b, t, h, d, block_size, knobs)
    seg = segment_ids.astype(jnp.int32)
    prev_blk = _prev_blk(seg, block_size)
    q_op, k_op, v_op = operands
    x, coef = _states(k, v, decay, seg, prev_blk, initial_state, block_size, tile, chunk_blocks, n_chunks,
                      interpret, knobs, d, k_op, v_op)
    w = tk.chunk_states(decay, seg, prev_blk, q, do, block=block_size, chunk_blocks=chunk_blocks, tile=tile,
                        reverse=True, interpret=interpret, head_dim=d, b_op=q_op, **_launch(knobs))
    y = jnp.concatenate([w, dfinal_state[:, :, None]], axis=2)
    z = jnp.einsum("bhjc,bhjde->bhcde", coef, y, precision=lax.Precision.HIGHEST)  # z[:, :, c] = dL/dx_c
    kw = dict(block=block_size, chunk_blocks=chunk_blocks, tile=tile, interpret=interpret, **_launch(knobs))
    plain = tk.PLAIN
    # (kernel arguments, the input whose gradient it is, that input's operand); chunk c of dk and dv reads
    # z[:, :, c + 1], the gradient of the state leaving it
    calls = ((dict(amat=do, bmat=v, cmat=k, states=x, operands=(plain, v_op, k_op), reverse=False, state_t=True),
              q, q_op),
             (dict(amat=v, bmat=do, cmat=q, states=z, operands=(v_op, plain, q_op), reverse=True, state_t=True,
                   state_offset=1), k, k_op),
             (dict(amat=k, bmat=q, cmat=do, states=z, operands=(k_op, q_op, plain), reverse=True, state_t=False,
                   state_offset=1), v, v_op))
    if not any(op.silu for op in operands):
        dq, dk, dv = (tk.chunk_outputs(decay, seg, prev_blk, **call, **kw).astype(x_.dtype) for call, x_, _ in calls)
        return dq, dk, dv, z[:, :, 0]
    if not (q is k is v and all(op.silu for op in operands)):
        raise ValueError("triton backend: SiLU operands must all be columns of one packed projection")
    dproj = None
    for call, _, op in calls:
        place = dict(into=dproj) if dproj is not None else dict(out_width=q.shape[-1])
        dproj = tk.chunk_outputs(decay, seg, prev_blk, **call, **kw, **place, out_col=op.col, silu_pre=q,
                                 grad_of=op.col)
    return dproj, z[:, :, 0]
