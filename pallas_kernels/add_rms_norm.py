"""RMSNorm of a scaled residual sum, ``weight * rmsnorm(a * x + b * y)``, in one pass forward and one backward.

MiniMax-01's postnorm layers normalize such a sum twice per layer: the layer input (the previous layer's normalized
MoE input and MoE output) and the attention sublayer's sum (its normalized input and the mixer output). XLA takes
two passes over ``[tokens, hidden]`` each way per norm, and one more to add the two gradients that reach a norm's
output (its output feeds a matmul and the next residual sum). On the H100 that was 20.7 ms of the ``small``
preset's 8 x 8K training step; with these kernels the norms take 14.6 ms. Most of the gain goes to two gathers of
the MoE that XLA had fused into the norm passes and now runs on their own (the experts' combine, 2.4 ms, and the
MoE's input gradient, 2.9 ms): the step gained 0.5% (``docs/benchmarks.md``). Taking them into the kernels is what
is left to win here.

``add_rms_norm`` returns its output twice, one copy per consumer: ``custom_vjp`` then hands the backward pass the
two cotangents separately, and the kernel adds them while it reads them. The backward kernel reads the two
cotangents, ``x`` and ``y`` once, writes ``dx`` and ``dy`` once, and leaves per-program partial sums of the weight
gradient (the statistics are recomputed, not stored).

Rounding follows the model's ops in the compute dtype: ``a * x``, ``b * y`` and their sum are rounded to ``x.dtype``
(``a`` and ``b`` first), the statistics are fp32, and ``normed`` is rounded before the weight (in ``x.dtype``)
multiplies it, as ``minimax_jax.model.norms_rope.rms_norm`` does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.manual_axes import out_struct

# Rows per block, Triton warps, and blocks walked by one backward program (its weight-gradient partial sum);
# the best of 12 launch shapes on an H100 (scripts/bench_norm.py --sweep).
LAUNCH = {"rows": 4, "num_warps": 8, "backward_blocks": 16}
_MAX_HIDDEN = 16384


def add_rms_norm_reference(x: jax.Array, y: jax.Array, weight: jax.Array, scales: jax.Array, eps: float
                           ) -> jax.Array:
    """``weight * rmsnorm(scales[0] * x + scales[1] * y)`` in jnp, over the last axis (the module docstring)."""
    dtype = x.dtype
    summed = scales[0].astype(dtype) * x + scales[1].astype(dtype) * y.astype(dtype)
    xf = summed.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(dtype)
    return weight.astype(dtype) * normed


def kernel_fits(x: jax.Array) -> bool:
    """Whether the kernels take ``x``: a power-of-two hidden size of 128 to 16384 and a row count divisible by
    one block of ``LAUNCH["rows"]`` rows."""
    hidden = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    return (128 <= hidden <= _MAX_HIDDEN and hidden & (hidden - 1) == 0 and rows % LAUNCH["rows"] == 0
            and x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16))


def _rounded(value, dtype):
    return value.astype(dtype).astype(jnp.float32)


def _normalize(x_ref, y_ref, scales_ref, rows, dtype, eps):
    """fp32 ``summed`` (rounded like the model's ops), its fp32 inverse RMS ``[rows, 1]`` and rounded ``normed``."""
    a = _rounded(scales_ref[pl.ds(0, 1)], dtype)[:, None]
    b = _rounded(scales_ref[pl.ds(1, 1)], dtype)[:, None]
    summed = _rounded(_rounded(a * x_ref[rows, :].astype(jnp.float32), dtype)
                      + _rounded(b * y_ref[rows, :].astype(jnp.float32), dtype), dtype)
    inv_rms = jax.lax.rsqrt(jnp.mean(summed * summed, axis=1, keepdims=True) + eps)
    return summed, inv_rms, _rounded(summed * inv_rms, dtype), a, b


def _forward_kernel(x_ref, y_ref, weight_ref, scales_ref, out_ref, *, block_rows, eps):
    rows = pl.ds(pl.program_id(0) * block_rows, block_rows)
    _, _, normed, _, _ = _normalize(x_ref, y_ref, scales_ref, rows, out_ref.dtype, eps)
    weight = weight_ref[...].astype(jnp.float32)[None, :]
    out_ref[rows, :] = (weight * normed).astype(out_ref.dtype)


def _backward_kernel(g1_ref, g2_ref, x_ref, y_ref, weight_ref, scales_ref, dx_ref, dy_ref, dweight_ref, *,
                     block_rows, blocks, eps):
    dtype = dx_ref.dtype
    weight = weight_ref[...].astype(jnp.float32)[None, :]
    first_block = pl.program_id(0) * blocks

    def block(i, dweight):
        rows = pl.ds((first_block + i) * block_rows, block_rows)
        summed, inv_rms, normed, a, b = _normalize(x_ref, y_ref, scales_ref, rows, dtype, eps)
        grad = g1_ref[rows, :].astype(jnp.float32) + g2_ref[rows, :].astype(jnp.float32)
        d_normed = grad * weight
        # d/ds of s * r(s), r = (mean(s^2) + eps)^(-1/2): r * dn - s * r^3 * mean(dn * s)
        mean_dot = jnp.mean(d_normed * summed, axis=1, keepdims=True)
        d_summed = inv_rms * d_normed - summed * (inv_rms * inv_rms * inv_rms) * mean_dot
        dx_ref[rows, :] = (a * d_summed).astype(dtype)
        dy_ref[rows, :] = (b * d_summed).astype(dy_ref.dtype)
        return dweight + grad * normed

    hidden = weight_ref.shape[0]
    dweight = jax.lax.fori_loop(0, blocks, block, jnp.zeros((block_rows, hidden), jnp.float32))
    dweight_ref[pl.ds(pl.program_id(0), 1), :] = jnp.sum(dweight, axis=0)[None, :]


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def backward_launch(rows: int) -> tuple[int, int, int]:
    """Rows per block, blocks per program and programs of a backward row-norm kernel over ``rows`` rows: each
    program walks ``LAUNCH["backward_blocks"]`` blocks, or the largest divisor of the block count below that."""
    block_rows = LAUNCH["rows"]
    blocks = math.gcd(rows // block_rows, LAUNCH["backward_blocks"])
    return block_rows, blocks, rows // (block_rows * blocks)


def compiler_params() -> pltriton.CompilerParams:
    """The Triton launch of the row-norm kernels (``LAUNCH``)."""
    return pltriton.CompilerParams(num_warps=LAUNCH["num_warps"], num_stages=1)


def _forward(x, y, weight, scales, eps, interpret):
    flat_x, flat_y = _flat(x), _flat(y)
    block_rows = LAUNCH["rows"]
    out = pl.pallas_call(
        functools.partial(_forward_kernel, block_rows=block_rows, eps=eps),
        out_shape=out_struct(flat_x.shape, x.dtype, x),
        grid=(flat_x.shape[0] // block_rows,),
        compiler_params=compiler_params(),
        interpret=interpret,
        name="add_rms_norm",
    )(flat_x, flat_y, weight.astype(x.dtype), scales.astype(jnp.float32))
    return out.reshape(x.shape)


def _backward(g1, g2, x, y, weight, scales, eps, interpret):
    flat_x = _flat(x)
    rows, hidden = flat_x.shape
    block_rows, blocks, programs = backward_launch(rows)
    dx, dy, dweight = pl.pallas_call(
        functools.partial(_backward_kernel, block_rows=block_rows, blocks=blocks, eps=eps),
        out_shape=(out_struct(flat_x.shape, x.dtype, x), out_struct(flat_x.shape, y.dtype, x),
                   out_struct((programs, hidden), jnp.float32, x)),
        grid=(programs,),
        compiler_params=compiler_params(),
        interpret=interpret,
        name="add_rms_norm_backward",
    )(_flat(g1), _flat(g2), flat_x, _flat(y), weight.astype(x.dtype), scales.astype(jnp.float32))
    return dx.reshape(x.shape), dy.reshape(y.shape), jnp.sum(dweight, axis=0).astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _add_rms_norm_kernel(x, y, weight, scales, eps, interpret):
    return _kernel_fwd(x, y, weight, scales, eps, interpret)[0]


def _kernel_fwd(x, y, weight, scales, eps, interpret):
    out = _forward(x, y, weight, scales, eps, interpret)
    return (out, out), (x, y, weight, scales)


def _kernel_bwd(eps, interpret, residuals, cotangents):
    x, y, weight, scales = residuals
    dx, dy, dweight = _backward(*cotangents, x, y, weight, scales, eps, interpret)
    return dx, dy, dweight, jnp.zeros_like(scales)


_add_rms_norm_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def add_rms_norm(x: jax.Array, y: jax.Array, weight: jax.Array, scales: jax.Array, eps: float, *,
                 use_kernel: bool | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``weight * rmsnorm(scales[0] * x + scales[1] * y)`` over the last axis, returned twice (one copy per
    consumer; the gradient of each copy may differ, the kernel's backward adds them).

    Args:
      x, y: ``[..., hidden]`` of the same shape and dtype (the compute dtype).
      weight: ``[hidden]`` (cast to ``x.dtype`` before it multiplies, like the model's RMSNorm).
      scales: fp32 ``[2]`` (may be traced; no gradient flows to it).
      use_kernel: the Pallas-Triton kernels (``kernel_fits``); None: on GPUs when they fit, else jnp with autodiff.
      interpret: run the kernels in Pallas interpret mode (CPU tests).
    """
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"add_rms_norm: x {x.shape} {x.dtype} and y {y.shape} {y.dtype} must match")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"add_rms_norm: weight {weight.shape} must be [hidden] = {x.shape[-1:]}")
    if scales.shape != (2,):
        raise ValueError(f"add_rms_norm: scales must have shape (2,), got {scales.shape}")
    if use_kernel is None:
        use_kernel = jax.default_backend() == "gpu" and kernel_fits(x)
    if not use_kernel:
        out = add_rms_norm_reference(x, y, weight, jax.lax.stop_gradient(scales), eps)
        return out, out
    if not kernel_fits(x):
        raise ValueError(f"add_rms_norm kernels take a power-of-two hidden size in [128, {_MAX_HIDDEN}] and a row "
                         f"count divisible by {LAUNCH['rows']}; got x {x.shape} {x.dtype}")
    return _add_rms_norm_kernel(x, y, weight, scales, eps, interpret)
