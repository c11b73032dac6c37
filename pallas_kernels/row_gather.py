"""Row gather ``out[r] = x[index[r]]``, zeros where ``index[r] >= len(x)``, as a Pallas-Triton kernel (GPU; CPU
through ``interpret=True``).

The MoE moves whole rows between token order and its tile-aligned expert layout (``minimax_jax/model/moe_dispatch``).
XLA's gather with a fill value ran these copies at about 2.2 TB/s on an H100; here each program copies a few rows,
one contiguous load and store per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LAUNCH = {"rows": 8, "num_warps": 4}  # rows per program, warps per program


def fits(x: jax.Array, index: jax.Array) -> bool:
    """Whether ``gather_rows`` takes these shapes: 2-D rows of a power-of-two width (Triton blocks), whole programs."""
    width = x.shape[-1] if x.ndim == 2 else 0
    return (index.ndim == 1 and index.shape[0] % LAUNCH["rows"] == 0 and width >= 16
            and width & (width - 1) == 0)


def _kernel(index_ref, x_ref, out_ref):
    rows, num_items = out_ref.shape[0], x_ref.shape[0]
    first = pl.program_id(0) * rows
    for i in range(rows):  # independent loads: the compiler keeps them in flight together
        item = index_ref[first + i]
        row = x_ref[pl.ds(jnp.minimum(item, num_items - 1), 1), :]
        out_ref[pl.ds(i, 1), :] = jnp.where(item < num_items, row, jnp.zeros_like(row))


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_rows(x: jax.Array, index: jax.Array, *, interpret: bool = False) -> jax.Array:
    """``[len(index), D]``: row r is ``x[index[r]]``, or zeros where ``index[r] >= len(x)`` (see ``fits``)."""
    rows = LAUNCH["rows"]
    return pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((index.shape[0], x.shape[1]), x.dtype),
        grid=(index.shape[0] // rows,),
        in_specs=[pl.BlockSpec(), pl.BlockSpec()],  # whole arrays: rows are picked by index
        out_specs=pl.BlockSpec((rows, x.shape[1]), lambda i: (i, 0)),
        compiler_params=pltriton.CompilerParams(num_warps=LAUNCH["num_warps"], num_stages=1),
        interpret=interpret,
        name="gather_rows",
    )(index.astype(jnp.int32), x)
