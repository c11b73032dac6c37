"""Chunked (blocked) lightning attention in plain JAX: the portable fallback and the CPU default.

All blocks are processed in parallel (the "chunk-parallel" form): per block ``n`` with state ``S_n`` entering it,

    O_n     = (Q_n * qdec) @ S_n + ((Q_n @ K_n^T) * M) @ V_n
    S_{n+1} = g_n S_n + (K_n * kdec)^T @ V_n

where, with positions ``r = 0..C-1`` in the block and the normalized segment index (see ``ops.py``),
``qdec_r = exp(-s (r+1))`` if position r continues the segment alive before the block (else 0),
``kdec_r = exp(-s (C-1-r))`` if r is in the block's last segment (else 0), ``g_n = exp(-s C)`` if the block is one
segment that continues the previous one (else 0), and ``M[i, j] = exp(-s (i-j))`` for ``j <= i`` in one segment.
The linear recurrence over blocks is an associative scan. Every exponent is non-positive.
The backward pass recomputes the forward under ``jax.vjp`` (residuals are only the inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK_SIZE = 256


def forward(q, k, v, decay, segment_ids, initial_state, *, block_size, interpret=False):
    """Backend contract of ``ops.py``: ``(o, final_state)`` for ``T`` a multiple of ``block_size``."""
    del interpret
    b, t, h, d = q.shape
    c = block_size
    n = t // c
    f32 = jnp.float32
    prec = lax.Precision.HIGHEST if q.dtype == f32 else lax.Precision.DEFAULT
    # Matmul operands in the input dtype (bf16 on accelerators), accumulation always fp32; XLA:CPU has no
    # bf16 x bf16 -> f32 dot, so CPU computes in fp32.
    mm_dtype = f32 if jax.default_backend() == "cpu" else q.dtype
    qb, kb, vb = (x.reshape(b, n, c, h, d).astype(mm_dtype) for x in (q, k, v))
    idx = segment_ids.reshape(b, n, c)
    prev = jnp.concatenate([jnp.zeros((b, 1), idx.dtype), idx[:, :-1, -1]], axis=1)  # index before each block
    last = idx[:, :, -1]
    s = decay.astype(f32)
    r = jnp.arange(c, dtype=f32)

    alive = (idx == prev[..., None]).astype(f32)[..., None]  # [B, N, C, 1]
    qdec = jnp.exp(-s * (r + 1)[:, None]) * alive  # [B, N, C, H]
    kdec = jnp.exp(-s * (c - 1 - r)[:, None]) * (idx == last[..., None]).astype(f32)[..., None]
    g = jnp.exp(-s * c) * (last == prev).astype(f32)[..., None]  # [B, N, H]

    diff = r[:, None] - r[None, :]
    mask = jnp.where(diff >= 0, jnp.exp(-s[:, None, None] * jnp.maximum(diff, 0)), 0.0)  # [H, C, C]
    same = (idx[..., :, None] == idx[..., None, :]).astype(f32)  # [B, N, C, C]
    scores = jnp.einsum("bnihd,bnjhd->bnhij", qb, kb, precision=prec, preferred_element_type=f32)
    p = (scores * mask * same[:, :, None]).astype(mm_dtype)
    o = jnp.einsum("bnhij,bnjhe->bnihe", p, vb, precision=prec, preferred_element_type=f32)

    kw = (kb.astype(f32) * kdec[..., None]).astype(mm_dtype)
    u = jnp.einsum("bnjhd,bnjhe->bnhde", kw, vb, precision=prec, preferred_element_type=f32)  # [B, N, H, D, D]

    def combine(x, y):
        return x[0] * y[0], y[0][..., None, None] * x[1] + y[1]

    a_cum, u_cum = lax.associative_scan(combine, (g, u), axis=1)
    s_out = a_cum[..., None, None] * initial_state[:, None] + u_cum  # state after each block
    s_in = jnp.concatenate([initial_state[:, None], s_out[:, :-1]], axis=1)

    qw = (qb.astype(f32) * qdec[..., None]).astype(mm_dtype)
    o = o + jnp.einsum("bnihd,bnhde->bnihe", qw, s_in.astype(mm_dtype), precision=prec,
                       preferred_element_type=f32)
    return o.reshape(b, t, h, d).astype(q.dtype), s_out[:, -1]


def backward(q, k, v, decay, segment_ids, initial_state, do, dfinal_state, *, block_size, interpret=False):
    """Backend contract of ``ops.py``: recomputes ``forward`` under ``jax.vjp`` and pulls the cotangents back."""

    def f(q_, k_, v_, s_):
        return forward(q_, k_, v_, decay, segment_ids, s_, block_size=block_size)

    _, pullback = jax.vjp(f, q, k, v, initial_state)
    return pullback((do, dfinal_state))
