"""Pallas Mosaic (TPU) kernels for lightning attention (forward and backward).

Backend module for ``pallas_kernels.lightning.ops`` (``backend="mosaic"``). Inputs arrive validated by ops.py
(see the CONTRACT in its docstring); this module exposes

    forward(q, k, v, decay, segment_ids, initial_state, *, block_size, interpret) -> (o, final_state)
    backward(q, k, v, decay, segment_ids, initial_state, do, dfinal_state, *, block_size, interpret)
        -> (dq, dk, dv, dinitial_state)

with q, k, v, o ``[batch, seq, heads, head_dim]`` (bf16 or fp32; fp16, which ops.py also admits, is computed with
fp32 matmuls and was checked in interpret mode only), decay ``[heads]`` fp32, segment_ids the NORMALIZED int32
segment index ``[batch, seq]`` of the ops.py contract (non-decreasing, 0 on the row's first segment, +1 at each
segment start), states fp32 ``[batch, heads, head_dim, head_dim]``; seq is a multiple of block_size (ops.py runs
the tail in plain JAX).

Math (per head, rate s): ``o_t = sum_{tau <= t, same segment} exp(-s (t - tau)) (q_t . k_tau) v_tau``;
``initial_state`` enters segment index 0 and the final state is the one after the last position.

Design (one program per (batch, head), sequential over chunks of ``block_size`` positions):
  grid ``(batch, heads, chunks)`` with semantics ``(parallel, parallel, arbitrary)``; the fp32 D x D state is a
  VMEM scratch carried across the chunk axis, the per-head rate is a scalar-prefetch (SMEM) operand, and the
  C x C decay matrix ``exp(-s (i - j)) [i >= j]`` is built once per (batch, head) into a second VMEM scratch
  (each chunk then only applies its segment mask: no C x C exponentials per chunk). For one chunk with positions
  i, j in [0, C), segment index r, r_prev the index of the position before the chunk (0 for the first chunk) and
  r_last the index of the chunk's last position:

      M[i, j] = exp(-s (i - j)) [i >= j] [r_i == r_j]
      qd[i]   = exp(-s (i + 1)) [r_i == r_prev]            (the incoming state only reaches its own segment)
      kd[j]   = exp(-s (C - 1 - j)) [r_j == r_last]        (the outgoing state holds only the last segment)
      g       = exp(-s C) [r_last == r_prev]
      O       = ((Q K^T) * M) V + (Q * qd) S
      S'      = g S + (K * kd)^T V

  Backward = two sweeps, both recomputing what they need rather than storing per-chunk states:
    * forward sweep (dq):  dQ = ((dO V^T) * M) K + (dO S^T) * qd, with S recomputed as above;
    * reverse sweep (dk, dv, dinitial_state), chunk index reversed through the index maps, dS starting from
      dfinal_state:  dK = ((V dO^T) * M^T) Q + (V dS^T) * kd,  dV = ((K Q^T) * M^T) dO + (K * kd) dS,
      dS <- g dS + (Q * qd)^T dO;  dinitial_state is dS after chunk 0.
  All exponents are non-positive (no overflow). Matmuls accumulate in fp32; with bf16 inputs the MXU operands
  (including the fp32 state and the masked score tiles) are rounded to bf16, with fp32 inputs every matmul runs
  at HIGHEST precision.

Layout: when head_dim is a multiple of 128 (the production case, D = 128) q/k/v/o are read in place as
``[batch, seq, heads * head_dim]`` (free reshape, block ``(C, D)`` at column block ``h``): no transposes.
Otherwise they are transposed to ``[batch, heads, seq, D]`` in the wrapper so that the block covers the full
last dimension. The segment index is passed as compact lane-major rows ``[batch, chunks, 2, block]`` holding
(r_t, r_{t-1}); the kernels transpose r to a column in registers.

Inside ``jax.shard_map`` (check_vma) operands varying over fewer manual axes than the others (a replicated
``initial_state``, say) are cast to the union, and their gradients are summed back (psum) to the primal's type.

``interpret``: False compiles for TPU; True runs the TPU interpreter on CPU with
``pltpu.InterpretParams(detect_races=True)``; a ``pltpu.InterpretParams`` instance is passed through as is.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.manual_axes import like_primal, out_struct, to_varying, union_axes

__all__ = ["DEFAULT_BLOCK_SIZE", "forward", "backward", "interpret_params"]

DEFAULT_BLOCK_SIZE = 256

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def interpret_params(interpret) -> bool | pltpu.InterpretParams:
    """Maps the ``interpret`` argument to what ``pallas_call`` takes."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    if interpret:
        return pltpu.InterpretParams(detect_races=True)
    return False


# --------------------------------------------------------------------------------------------------------------
# In-kernel helpers.


def _mm(a, b, dims=None, *, mm_dtype):
    """fp32-accumulated matmul with operands in ``mm_dtype`` (HIGHEST precision for fp32 operands)."""
    a = a.astype(mm_dtype)
    b = b.astype(mm_dtype)
    # explicit either way, so a global jax_default_matmul_precision cannot change the kernel (Mosaic rejects
    # HIGHEST on 16-bit operands)
    precision = lax.Precision.HIGHEST if mm_dtype == _F32 else lax.Precision.DEFAULT
    if dims is None:
        dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _decay_matrix(s, c, *, transpose: bool):
    """(C, C) fp32 ``exp(-s (i - j)) [i >= j]`` at [i, j] (or at [j, i] when ``transpose``).

    It depends on the head only: the kernels build it once per (batch, head) row of the grid into a VMEM scratch.
    """
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    later, earlier = (cols, rows) if transpose else (rows, cols)
    causal = later >= earlier
    return jnp.where(causal, jnp.exp(-s * jnp.where(causal, later - earlier, 0).astype(_F32)), 0.0)


def _chunk_decays(s, dmat, seg):
    """Masks and decays of one chunk (see the module docstring).

    ``dmat``: (C, C) from ``_decay_matrix``; ``seg``: (2, C) int32 rows (r_t, r_{t-1}) over the chunk's positions.
    Returns ``mask`` (C, C) (M, or M^T for a transposed ``dmat``: the segment test is symmetric), ``qd`` (C, 1),
    ``kd`` (C, 1) and ``g`` (1, 1), all fp32.
    """
    c = seg.shape[-1]
    r_row = seg[0:1, :]  # (1, C)
    r_prev = seg[1:2, 0:1]  # (1, 1): segment index of the position before the chunk
    r_last = seg[0:1, c - 1 : c]  # (1, 1)
    # The column form (C, 1) by an in-register transpose (HBM keeps the compact lane-major rows: a [.., C, 1]
    # operand would be padded to 128 lanes, i.e. read 128x over).
    r_col = jnp.broadcast_to(r_row, (8, c)).T[:, 0:1]
    mask = jnp.where(r_col == r_row, dmat, 0.0)
    pos = lax.broadcasted_iota(jnp.int32, (c, 1), 0).astype(_F32)
    qd = jnp.where(r_col == r_prev, jnp.exp(-s * (pos + 1.0)), 0.0)
    kd = jnp.where(r_col == r_last, jnp.exp(-s * ((c - 1.0) - pos)), 0.0)
    g = jnp.where(r_last == r_prev, jnp.exp(jnp.full((1, 1), -s * c, _F32)), 0.0)
    return mask, qd, kd, g


# --------------------------------------------------------------------------------------------------------------
# Kernels. Refs: decay (SMEM, scalar prefetch), then blocks; chunk blocks are (C, D) after squeezing.


def _fwd_kernel(decay_ref, q_ref, k_ref, v_ref, seg_ref, s0_ref, o_ref, sfin_ref, s_scr, dmat_scr, *, mm_dtype):
    h, c = pl.program_id(1), pl.program_id(2)
    s = decay_ref[h]

    @pl.when(c == 0)
    def _():
        s_scr[...] = s0_ref[...]
        dmat_scr[...] = _decay_matrix(s, dmat_scr.shape[0], transpose=False)

    mask, qd, kd, g = _chunk_decays(s, dmat_scr[...], seg_ref[...])
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    state = s_scr[...]
    mm = functools.partial(_mm, mm_dtype=mm_dtype)
    scores = mm(q, k, _NT) * mask
    o = mm(scores, v) + mm(q.astype(_F32) * qd, state)
    o_ref[...] = o.astype(o_ref.dtype)
    new_state = g * state + mm(k.astype(_F32) * kd, v, _TN)
    s_scr[...] = new_state

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        sfin_ref[...] = new_state


def _bwd_dq_kernel(decay_ref, k_ref, v_ref, do_ref, seg_ref, s0_ref, dq_ref, s_scr, dmat_scr, *, mm_dtype):
    h, c = pl.program_id(1), pl.program_id(2)
    s = decay_ref[h]

    @pl.when(c == 0)
    def _():
        s_scr[...] = s0_ref[...]
        dmat_scr[...] = _decay_matrix(s, dmat_scr.shape[0], transpose=False)

    mask, qd, kd, g = _chunk_decays(s, dmat_scr[...], seg_ref[...])
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    state = s_scr[...]
    mm = functools.partial(_mm, mm_dtype=mm_dtype)
    dp = mm(do, v, _NT) * mask  # (dO V^T) * M
    dq = mm(dp, k) + mm(do, state, _NT) * qd
    dq_ref[...] = dq.astype(dq_ref.dtype)
    s_scr[...] = g * state + mm(k.astype(_F32) * kd, v, _TN)


def _bwd_dkv_kernel(
    decay_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    seg_ref,
    dsfin_ref,
    dk_ref,
    dv_ref,
    ds0_ref,
    ds_scr,
    dmat_scr,
    *,
    mm_dtype,
):
    h, c = pl.program_id(1), pl.program_id(2)  # c counts chunks from the END of the row
    s = decay_ref[h]

    @pl.when(c == 0)
    def _():
        ds_scr[...] = dsfin_ref[...]
        dmat_scr[...] = _decay_matrix(s, dmat_scr.shape[0], transpose=True)

    mask_t, qd, kd, g = _chunk_decays(s, dmat_scr[...], seg_ref[...])
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    ds = ds_scr[...]  # gradient of the state leaving this chunk
    mm = functools.partial(_mm, mm_dtype=mm_dtype)
    dpt = mm(v, do, _NT) * mask_t  # ((dO V^T) * M)^T
    st = mm(k, q, _NT) * mask_t  # ((Q K^T) * M)^T
    dk = mm(dpt, q) + mm(v, ds, _NT) * kd
    dv = mm(st, do) + mm(k.astype(_F32) * kd, ds)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    new_ds = g * ds + mm(q.astype(_F32) * qd, do, _TN)
    ds_scr[...] = new_ds

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = new_ds


# --------------------------------------------------------------------------------------------------------------
# Wrapper plumbing.


def _segment_blocks(seg_idx, block):
    """Normalized segment index r (ops.py contract) as per-chunk rows [B, N / C, 2, C]: (r_t, r_{t-1}), r_{-1} = 0.

    A (2, C) block equals the array's last two dimensions for any C, and the lane-major rows stay compact in HBM
    (2 x 4 bytes per position, under 1% of the q/k/v/o traffic at D = 128).
    """
    r = seg_idx.astype(jnp.int32)
    b, n = r.shape
    r_prev = jnp.concatenate([jnp.zeros_like(r[:, :1]), r[:, :-1]], axis=1)
    return jnp.stack([r.reshape(b, n // block, block), r_prev.reshape(b, n // block, block)], axis=2)


def _flat_layout(head_dim: int, heads: int) -> bool:
    """Read [B, N, H*D] in place (block (C, D) at column block h) when the block is lane-legal."""
    return head_dim % 128 == 0 or heads == 1


class _Layout:
    """BlockSpecs and array views for the [B, N, H, D] operands of one kernel."""

    def __init__(self, batch, seq, heads, head_dim, block, *, reverse: bool):
        self.b, self.n, self.h, self.d, self.c = batch, seq, heads, head_dim, block
        self.nc = seq // block
        self.flat = _flat_layout(head_dim, heads)
        nc = self.nc
        self.chunk = (lambda c: nc - 1 - c) if reverse else (lambda c: c)

    # q/k/v/o-like operands.
    def to_kernel(self, x):
        if self.flat:
            return x.reshape(self.b, self.n, self.h * self.d)
        return jnp.transpose(x, (0, 2, 1, 3))

    def from_kernel(self, x):
        if self.flat:
            return x.reshape(self.b, self.n, self.h, self.d)
        return jnp.transpose(x, (0, 2, 1, 3))

    def seq_spec(self):
        chunk = self.chunk
        if self.flat:
            return pl.BlockSpec((None, self.c, self.d), lambda b, h, c, *_: (b, chunk(c), h))
        return pl.BlockSpec((None, None, self.c, self.d), lambda b, h, c, *_: (b, h, chunk(c), 0))

    def seq_shape(self, dtype, like):
        shape = (self.b, self.n, self.h * self.d) if self.flat else (self.b, self.h, self.n, self.d)
        return out_struct(shape, dtype, like)

    # Segment index rows.
    def seg_spec(self):
        chunk = self.chunk
        return pl.BlockSpec((None, None, 2, self.c), lambda b, h, c, *_: (b, chunk(c), 0, 0))

    # [B, H, D, D] states.
    def state_spec(self):
        return pl.BlockSpec((None, None, self.d, self.d), lambda b, h, c, *_: (b, h, 0, 0))

    def state_shape(self, like):
        return out_struct((self.b, self.h, self.d, self.d), _F32, like)

    @property
    def grid(self):
        return (self.b, self.h, self.nc)


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _mm_dtype(dtype):
    """MXU operand dtype: bf16 for bf16 inputs, fp32 (HIGHEST) otherwise (fp32; fp16 is upcast)."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else jnp.dtype(_F32)


def _check(q, block_size):
    n = q.shape[1]
    if n % block_size:
        raise ValueError(
            f"mosaic: seq {n} must be a multiple of block_size {block_size} (ops.py runs the tail in plain JAX)"
        )
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(_F32), jnp.dtype(jnp.float16)):
        raise ValueError(f"mosaic: dtype {q.dtype} not supported (bf16, fp32 or fp16)")


# --------------------------------------------------------------------------------------------------------------
# Public entry points (see the module docstring for the contract).


def forward(q, k, v, decay, segment_ids, initial_state, *, block_size, interpret=False):
    """Returns ``(o [B, N, H, D] in q.dtype, final_state [B, H, D, D] fp32)``."""
    _check(q, block_size)
    b, n, h, d = q.shape
    axes = union_axes(q, k, v, decay, segment_ids, initial_state)
    q, k, v, decay, segment_ids, initial_state = (
        to_varying(x, axes) for x in (q, k, v, decay, segment_ids, initial_state)
    )
    lay = _Layout(b, n, h, d, block_size, reverse=False)
    seg = _segment_blocks(segment_ids, block_size)
    seq = lay.seq_spec()
    o, final_state = pl.pallas_call(
        functools.partial(_fwd_kernel, mm_dtype=_mm_dtype(q.dtype)),
        out_shape=(lay.seq_shape(q.dtype, q), lay.state_shape(q)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=lay.grid,
            in_specs=[seq, seq, seq, lay.seg_spec(), lay.state_spec()],
            out_specs=[seq, lay.state_spec()],
            scratch_shapes=[pltpu.VMEM((d, d), _F32), pltpu.VMEM((block_size, block_size), _F32)],
        ),
        compiler_params=_compiler_params(),
        interpret=interpret_params(interpret),
        name="lightning_mosaic_fwd",
    )(
        decay.astype(_F32),
        lay.to_kernel(q),
        lay.to_kernel(k),
        lay.to_kernel(v),
        seg,
        initial_state.astype(_F32),
    )
    return lay.from_kernel(o), final_state


def backward(q, k, v, decay, segment_ids, initial_state, do, dfinal_state, *, block_size, interpret=False):
    """Returns ``(dq, dk, dv, dinitial_state)``; dq/dk/dv in the dtypes of q/k/v, dinitial_state fp32."""
    _check(q, block_size)
    b, n, h, d = q.shape
    primals = (q, k, v, initial_state)
    axes = union_axes(q, k, v, decay, segment_ids, initial_state, do, dfinal_state)
    q, k, v, decay, segment_ids, initial_state, do, dfinal_state = (
        to_varying(x, axes) for x in (q, k, v, decay, segment_ids, initial_state, do, dfinal_state)
    )
    mm_dtype = _mm_dtype(q.dtype)
    decay = decay.astype(_F32)
    seg = _segment_blocks(segment_ids, block_size)
    do = do.astype(q.dtype)

    fwd = _Layout(b, n, h, d, block_size, reverse=False)
    seq = fwd.seq_spec()
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, mm_dtype=mm_dtype),
        out_shape=fwd.seq_shape(q.dtype, q),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=fwd.grid,
            in_specs=[seq, seq, seq, fwd.seg_spec(), fwd.state_spec()],
            out_specs=seq,
            scratch_shapes=[pltpu.VMEM((d, d), _F32), pltpu.VMEM((block_size, block_size), _F32)],
        ),
        compiler_params=_compiler_params(),
        interpret=interpret_params(interpret),
        name="lightning_mosaic_bwd_dq",
    )(decay, fwd.to_kernel(k), fwd.to_kernel(v), fwd.to_kernel(do), seg, initial_state.astype(_F32))

    rev = _Layout(b, n, h, d, block_size, reverse=True)
    seq = rev.seq_spec()
    dk, dv, dinitial_state = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, mm_dtype=mm_dtype),
        out_shape=(rev.seq_shape(k.dtype, q), rev.seq_shape(v.dtype, q), rev.state_shape(q)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=rev.grid,
            in_specs=[seq, seq, seq, seq, rev.seg_spec(), rev.state_spec()],
            out_specs=[seq, seq, rev.state_spec()],
            scratch_shapes=[pltpu.VMEM((d, d), _F32), pltpu.VMEM((block_size, block_size), _F32)],
        ),
        compiler_params=_compiler_params(),
        interpret=interpret_params(interpret),
        name="lightning_mosaic_bwd_dkv",
    )(
        decay,
        rev.to_kernel(q),
        rev.to_kernel(k),
        rev.to_kernel(v),
        rev.to_kernel(do),
        seg,
        dfinal_state.astype(_F32),
    )
    grads = (fwd.from_kernel(dq), rev.from_kernel(dk), rev.from_kernel(dv), dinitial_state)
    return tuple(like_primal(g, x) for g, x in zip(grads, primals, strict=True))
