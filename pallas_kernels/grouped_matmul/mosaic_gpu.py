"""Hopper backend of the grouped matmul: jax's own Pallas Mosaic-GPU ragged-dot kernels (wgmma + TMA pipelines,
``jax.experimental.pallas.ops.gpu``), used on the tile-aligned layout's padded group sizes.

Those kernels leave rows outside every group unwritten, so outputs are masked to zeros past the used rows (the
``ops.py`` contract), and the weight gradient only ever reads rows inside groups. On an H100 at the small preset's
MoE shapes they ran 1.2x (forward) to 2x (weight gradient) faster than ``triton_kernels.py``
(docs/benchmarks.md). sm_90 only; no interpret mode, so CPU tests cover the Triton kernels instead.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

# Launch shapes from an H100 sweep at the small preset's MoE shapes (docs/benchmarks.md).
TUNING = {
    "gmm": {"block_m": 128, "block_n": 128, "block_k": 64, "max_concurrent_steps": 4, "grid_block_n": 4},
    "tgmm": {"block_m": 128, "block_n": 128, "block_k": 64, "max_concurrent_steps": 4, "grid_block_n": 1},
}


def fits(k: int, n: int, dtype) -> bool:
    """Whether the kernels take a ``[R, k] @ [G, k, n]`` problem (and its transposes) in ``dtype``."""
    gmm, tgmm = TUNING["gmm"], TUNING["tgmm"]
    return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and all(d % gmm["block_k"] == 0 for d in (k, n))
            and all(d % (gmm["block_n"] * gmm["grid_block_n"]) == 0 for d in (k, n))
            and all(d % tgmm["block_m"] == 0 and d % tgmm["block_n"] == 0 for d in (k, n)))


def _used_rows_only(out, used_rows):
    return jnp.where(jnp.arange(out.shape[0])[:, None] < used_rows, out, jnp.zeros((), out.dtype))


def gmm(x, w, group_sizes, *, transpose_w=False):
    """``x @ w[g]`` (``w [G, k, n]``; with ``transpose_w`` ``x @ w[g].T``) per contiguous row group of
    ``group_sizes`` rows; zeros past ``sum(group_sizes)``."""
    out = ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes, transpose_rhs=transpose_w, **TUNING["gmm"])
    return _used_rows_only(out, jnp.sum(group_sizes))


def tgmm(x, dy, group_sizes):
    """``[G, k, n]``: per row group, ``x_g^T @ dy_g``."""
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy, group_sizes=group_sizes, **TUNING["tgmm"])
