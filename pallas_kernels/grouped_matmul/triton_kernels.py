"""Pallas-Triton kernels of the tile-aligned grouped matmul (GPU; CPU through ``interpret=True``).

Rows come in tiles of ``tm`` rows; every tile belongs to one group, named by ``tile_group[i]`` (non-decreasing;
``num_groups`` marks unused trailing tiles). Two kernels:

* ``gmm``: ``out[tile i] = x[tile i] @ w[tile_group[i]]`` (or ``@ w[g].T``). One program per (column tile, row
  tile), column tiles fastest, so the programs that share a row tile run together and find it in L2, and a group's
  weight columns stay in L2 over the group's row tiles. Unused tiles are written as zeros.
* ``tgmm``: ``dw[g] = sum_{tiles i of g} x[tile i]^T @ dy[tile i]`` (the weight gradient). One program per
  (output column tile, output row tile, group) loops over its group's row tiles, found from ``group_tiles`` (the
  first tile of each group, then the number of used tiles). Empty groups get zeros.

Matmuls take ``mm_dtype`` operands and accumulate in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.manual_axes import out_struct

F32 = jnp.float32


def _dot(a, b, *, trans_a=False, trans_b=False):
    """fp32-accumulating 2-D matmul; fp32 operands use IEEE fp32 (Triton's default for them is TF32)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    # explicit either way, so a global jax_default_matmul_precision cannot change the kernel
    precision = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _gmm_kernel(tile_group_ref, x_ref, w_ref, out_ref, *, tm, tn, bk, num_groups, transpose_w, mm_dtype):
    col_tile, row_tile = pl.program_id(0), pl.program_id(1)
    group = tile_group_ref[row_tile]
    rows, cols = pl.ds(row_tile * tm, tm), pl.ds(col_tile * tn, tn)
    depth = x_ref.shape[1]

    @pl.when(group < num_groups)
    def _():
        def body(step, acc):
            inner = pl.ds(step * bk, bk)
            a = x_ref[rows, inner].astype(mm_dtype)
            if transpose_w:
                return acc + _dot(a, w_ref[group, cols, inner].astype(mm_dtype), trans_b=True)
            return acc + _dot(a, w_ref[group, inner, cols].astype(mm_dtype))

        acc = lax.fori_loop(0, depth // bk, body, jnp.zeros((tm, tn), F32))
        out_ref[rows, cols] = acc.astype(out_ref.dtype)

    @pl.when(group >= num_groups)
    def _():
        out_ref[rows, cols] = jnp.zeros((tm, tn), out_ref.dtype)


def _tgmm_kernel(group_tiles_ref, x_ref, dy_ref, out_ref, *, tm, bk, bn, mm_dtype):
    col_tile, row_tile, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first, end = group_tiles_ref[group], group_tiles_ref[group + 1]
    in_cols, out_cols = pl.ds(row_tile * bk, bk), pl.ds(col_tile * bn, bn)

    def body(tile, acc):
        rows = pl.ds(tile * tm, tm)
        a = x_ref[rows, in_cols].astype(mm_dtype)
        b = dy_ref[rows, out_cols].astype(mm_dtype)
        return acc + _dot(a, b, trans_a=True)

    acc = lax.fori_loop(first, end, body, jnp.zeros((bk, bn), F32))
    out_ref[group, in_cols, out_cols] = acc.astype(out_ref.dtype)


def _params(num_warps, num_stages):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("num_groups", "tm", "tn", "bk", "transpose_w", "interpret",
                                             "num_warps", "num_stages"))
def gmm(x, w, tile_group, *, num_groups, tm, tn, bk, transpose_w=False, interpret=False, num_warps=4,
        num_stages=3):
    """``[rows, n]`` in the dtype of ``x``: each row tile times its group's ``w`` (``[G, k, n]``, or ``[G, n, k]``
    with ``transpose_w``). Shapes are validated by ``ops.py``."""
    rows, n = x.shape[0], (w.shape[1] if transpose_w else w.shape[2])
    mm_dtype = F32 if interpret else x.dtype
    kernel = functools.partial(_gmm_kernel, tm=tm, tn=tn, bk=bk, num_groups=num_groups, transpose_w=transpose_w,
                               mm_dtype=mm_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((rows, n), x.dtype, x),
        grid=(n // tn, rows // tm),
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="grouped_matmul_t" if transpose_w else "grouped_matmul",
    )(tile_group, x, w)


@functools.partial(jax.jit, static_argnames=("num_groups", "tm", "bk", "bn", "out_dtype", "interpret",
                                             "num_warps", "num_stages"))
def tgmm(x, dy, group_tiles, *, num_groups, tm, bk, bn, out_dtype, interpret=False, num_warps=4, num_stages=3):
    """``[G, k, n]``: per group, the sum over its row tiles of ``x_tile^T @ dy_tile`` (``x [rows, k]``,
    ``dy [rows, n]``)."""
    k, n = x.shape[1], dy.shape[1]
    mm_dtype = F32 if interpret else x.dtype
    kernel = functools.partial(_tgmm_kernel, tm=tm, bk=bk, bn=bn, mm_dtype=mm_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((num_groups, k, n), out_dtype, x),
        grid=(n // bn, k // bk, num_groups),
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="grouped_matmul_wgrad",
    )(group_tiles, x, dy)
