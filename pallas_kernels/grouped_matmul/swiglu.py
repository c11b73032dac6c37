"""The MoE experts' SwiGLU with each row's routing weight: ``w * silu(gate) * up`` and its gradient, for
``gate_up = [gate | up]`` side by side on the last axis (the output of the stacked W1|W3 grouped matmul).

Weighting the hidden activations instead of the expert outputs gives the same result (W2 is linear), and it lets
the backward pass form the weights' gradient from ``gate_up`` and the hidden gradient, which it reads anyway:
the expert outputs need not be kept or read again. The gradient is one fp32 pass: a Pallas-Triton kernel on GPUs
(XLA splits an elementwise pass and a row reduction of different shapes into two passes), ``jnp`` elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.manual_axes import like_primal

GRAD_LAUNCH = {"rows": 8, "num_warps": 8}  # rows per program and warps of the gradient kernel (H100 sweep)


def _halves(gate_up):
    return (h.astype(jnp.float32) for h in jnp.split(gate_up, 2, axis=-1))


def _grad_math(gate, up, row_weight, d_hidden):
    """fp32 ``(d_gate, d_up, d_row_weight)`` for ``hidden = row_weight * silu(gate) * up``."""
    sigmoid = jax.nn.sigmoid(gate)
    silu = gate * sigmoid
    d_row_weight = jnp.sum(d_hidden * silu * up, axis=-1)
    d_swiglu = d_hidden * row_weight[..., None]
    d_gate = d_swiglu * up * sigmoid * (1 + gate * (1 - sigmoid))  # silu'(g) = s(g) (1 + g (1 - s(g)))
    return d_gate, d_swiglu * silu, d_row_weight


def weighted_swiglu_grad(gate_up: jax.Array, row_weight: jax.Array, d_hidden: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """Gradients of ``weighted_swiglu`` for ``d_hidden``: ``([d_gate | d_up], d_row_weight)``, in fp32, one pass."""
    gate, up = _halves(gate_up)
    d_gate, d_up, d_row_weight = _grad_math(gate, up, row_weight.astype(jnp.float32), d_hidden.astype(jnp.float32))
    return jnp.concatenate([d_gate, d_up], axis=-1).astype(gate_up.dtype), d_row_weight.astype(row_weight.dtype)


def _grad_kernel(gate_up_ref, row_weight_ref, d_hidden_ref, d_gate_up_ref, d_row_weight_ref):
    width = d_hidden_ref.shape[1]
    gate = gate_up_ref[:, pl.ds(0, width)].astype(jnp.float32)
    up = gate_up_ref[:, pl.ds(width, width)].astype(jnp.float32)
    d_gate, d_up, d_row_weight = _grad_math(gate, up, row_weight_ref[...], d_hidden_ref[...].astype(jnp.float32))
    d_gate_up_ref[:, pl.ds(0, width)] = d_gate.astype(d_gate_up_ref.dtype)
    d_gate_up_ref[:, pl.ds(width, width)] = d_up.astype(d_gate_up_ref.dtype)
    d_row_weight_ref[...] = d_row_weight


def kernel_fits(gate_up: jax.Array) -> bool:
    """Whether ``weighted_swiglu_grad_kernel`` takes ``gate_up [R, 2N]``: Triton blocks need N a power of two."""
    rows, width = gate_up.shape[0], gate_up.shape[-1] // 2
    return gate_up.ndim == 2 and rows % GRAD_LAUNCH["rows"] == 0 and width >= 16 and width & (width - 1) == 0


@functools.partial(jax.jit, static_argnames=("interpret",))
def weighted_swiglu_grad_kernel(gate_up: jax.Array, row_weight: jax.Array, d_hidden: jax.Array, *,
                                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``weighted_swiglu_grad`` as one Pallas-Triton kernel: ``gate_up [R, 2N]``, ``row_weight`` fp32 ``[R]``,
    ``d_hidden [R, N]`` (see ``kernel_fits``)."""
    rows, width = d_hidden.shape
    block_rows = GRAD_LAUNCH["rows"]
    block = functools.partial(pl.BlockSpec, index_map=lambda i: (i, 0))
    return pl.pallas_call(
        _grad_kernel,
        out_shape=(jax.ShapeDtypeStruct(gate_up.shape, gate_up.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)),
        grid=(rows // block_rows,),
        in_specs=[block((block_rows, 2 * width)), pl.BlockSpec((block_rows,), lambda i: (i,)),
                  block((block_rows, width))],
        out_specs=(block((block_rows, 2 * width)), pl.BlockSpec((block_rows,), lambda i: (i,))),
        compiler_params=pltriton.CompilerParams(num_warps=GRAD_LAUNCH["num_warps"], num_stages=1),
        interpret=interpret,
        name="weighted_swiglu_grad",
    )(gate_up, row_weight.astype(jnp.float32), d_hidden)


@jax.custom_vjp
def weighted_swiglu(gate_up: jax.Array, row_weight: jax.Array) -> jax.Array:
    """``row_weight * silu(gate) * up`` for ``gate_up = [gate | up]`` (``[..., 2I]`` -> ``[..., I]``) and one
    weight per row (``[...]``), computed in fp32 and rounded once; its backward pass is ``weighted_swiglu_grad``."""
    gate, up = _halves(gate_up)
    return (row_weight.astype(jnp.float32)[..., None] * jax.nn.silu(gate) * up).astype(gate_up.dtype)


def _weighted_swiglu_fwd(gate_up, row_weight):
    return weighted_swiglu(gate_up, row_weight), (gate_up, row_weight)


def _weighted_swiglu_bwd(res, d_hidden):
    gate_up, row_weight = res
    d_gate_up, d_row_weight = weighted_swiglu_grad(gate_up, row_weight, d_hidden)
    # inside jax.shard_map a gradient must vary over the manual axes of its primal only
    return like_primal(d_gate_up, gate_up), like_primal(d_row_weight, row_weight)


weighted_swiglu.defvjp(_weighted_swiglu_fwd, _weighted_swiglu_bwd)
