"""Lightning attention's output path, ``sigmoid(gate) * (weight * rmsnorm(o))``, in one pass each way.

MiniMax-01 normalizes the lightning kernel's output over all heads x head_dim features of a token and multiplies it
by a sigmoid gate computed from the layer input. XLA's backward for this takes two passes over ``[tokens, heads,
head_dim]`` (row statistics, then the input gradient with the weight gradient's partial sums) and leaves the gate's
gradient to the fusion that assembles the projection's gradient, which then reads ``o``, the statistics and the
output gradient once more. The backward kernel reads ``dy``, ``o`` and the gate once and writes ``do`` and the
gate pre-activation's gradient, with per-program partial sums of the weight gradient (statistics are recomputed).

Rounding follows the model's ops in the compute dtype (``minimax_jax.model.lightning.lightning_output``): the
statistics are fp32, ``normed`` is rounded before the weight multiplies it, ``weight * normed`` and the sigmoid
are rounded, and so is their product. Gradients are computed in fp32 and rounded once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.add_rms_norm import LAUNCH, backward_launch, compiler_params, kernel_fits
from pallas_kernels.manual_axes import out_struct


def gated_rms_norm_reference(o: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``sigmoid(gate) * (weight * rmsnorm(o))`` in jnp, normalizing over the trailing ``weight.ndim`` axes."""
    dtype = gate.dtype
    axes = tuple(range(o.ndim - weight.ndim, o.ndim))
    of = o.astype(jnp.float32)
    normed = (of * jax.lax.rsqrt(jnp.mean(jnp.square(of), axis=axes, keepdims=True) + eps)).astype(dtype)
    return jax.nn.sigmoid(gate) * (weight.astype(dtype) * normed)


def _rounded(value, dtype):
    return value.astype(dtype).astype(jnp.float32)


def _statistics(o_ref, gate_ref, rows, dtype, eps):
    """fp32 ``o``, its inverse RMS ``[rows, 1]``, rounded ``normed`` and rounded ``sigmoid(gate)``."""
    o = o_ref[rows, :].astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(o * o, axis=1, keepdims=True) + eps)
    normed = _rounded(o * inv_rms, dtype)
    gate = _rounded(jax.nn.sigmoid(gate_ref[rows, :].astype(jnp.float32)), dtype)
    return o, inv_rms, normed, gate


def _forward_kernel(o_ref, gate_ref, weight_ref, out_ref, *, block_rows, eps):
    rows = pl.ds(pl.program_id(0) * block_rows, block_rows)
    dtype = out_ref.dtype
    weight = weight_ref[...].astype(jnp.float32)[None, :]
    _, _, normed, gate = _statistics(o_ref, gate_ref, rows, dtype, eps)
    out_ref[rows, :] = (gate * _rounded(weight * normed, dtype)).astype(dtype)


def _backward_kernel(dy_ref, o_ref, gate_ref, weight_ref, do_ref, dgate_ref, dweight_ref, *, block_rows, blocks, eps):
    dtype = dgate_ref.dtype
    weight = weight_ref[...].astype(jnp.float32)[None, :]
    first_block = pl.program_id(0) * blocks

    def block(i, dweight):
        rows = pl.ds((first_block + i) * block_rows, block_rows)
        o, inv_rms, normed, gate = _statistics(o_ref, gate_ref, rows, dtype, eps)
        dy = dy_ref[rows, :].astype(jnp.float32)
        dgate_ref[rows, :] = (dy * _rounded(weight * normed, dtype) * gate * (1.0 - gate)).astype(dtype)
        d_weighted = dy * gate
        d_normed = d_weighted * weight
        # d/do of o * r(o), r = (mean(o^2) + eps)^(-1/2): r * dn - o * r^3 * mean(dn * o)
        mean_dot = jnp.mean(d_normed * o, axis=1, keepdims=True)
        do_ref[rows, :] = (inv_rms * d_normed - o * (inv_rms * inv_rms * inv_rms) * mean_dot).astype(do_ref.dtype)
        return dweight + d_weighted * normed

    features = weight_ref.shape[0]
    dweight = jax.lax.fori_loop(0, blocks, block, jnp.zeros((block_rows, features), jnp.float32))
    dweight_ref[pl.ds(pl.program_id(0), 1), :] = jnp.sum(dweight, axis=0)[None, :]


def _explicitly_sharded(x: jax.Array) -> bool:
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(axis is not None for axis in spec)


def _rows(x: jax.Array, features: int) -> jax.Array:
    return x.reshape(-1, features)


def _forward(o, gate, weight, eps, interpret):
    features = weight.size
    flat_o = _rows(o, features)
    block_rows = LAUNCH["rows"]
    out = pl.pallas_call(
        functools.partial(_forward_kernel, block_rows=block_rows, eps=eps),
        out_shape=out_struct(flat_o.shape, gate.dtype, o),
        grid=(flat_o.shape[0] // block_rows,),
        compiler_params=compiler_params(),
        interpret=interpret,
        name="gated_rms_norm",
    )(flat_o, _rows(gate, features), weight.reshape(-1).astype(gate.dtype))
    return out.reshape(gate.shape)


def _backward(dy, o, gate, weight, eps, interpret):
    features = weight.size
    flat_o = _rows(o, features)
    block_rows, blocks, programs = backward_launch(flat_o.shape[0])
    do, dgate, dweight = pl.pallas_call(
        functools.partial(_backward_kernel, block_rows=block_rows, blocks=blocks, eps=eps),
        out_shape=(out_struct(flat_o.shape, o.dtype, o), out_struct(flat_o.shape, gate.dtype, o),
                   out_struct((programs, features), jnp.float32, o)),
        grid=(programs,),
        compiler_params=compiler_params(),
        interpret=interpret,
        name="gated_rms_norm_backward",
    )(_rows(dy, features), flat_o, _rows(gate, features), weight.reshape(-1).astype(gate.dtype))
    return do.reshape(o.shape), dgate.reshape(gate.shape), jnp.sum(dweight, axis=0).reshape(weight.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated_rms_norm_kernel(o, gate, weight, eps, interpret):
    return _forward(o, gate, weight, eps, interpret)


def _kernel_fwd(o, gate, weight, eps, interpret):
    return _forward(o, gate, weight, eps, interpret), (o, gate, weight)


def _kernel_bwd(eps, interpret, residuals, dy):
    o, gate, weight = residuals
    do, dgate, dweight = _backward(dy, o, gate, weight, eps, interpret)
    return do, dgate, dweight.astype(weight.dtype)


_gated_rms_norm_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def gated_rms_norm(o: jax.Array, gate: jax.Array, weight: jax.Array, eps: float, *, use_kernel: bool | None = None,
                   interpret: bool = False) -> jax.Array:
    """``sigmoid(gate) * (weight * rmsnorm(o))``, normalizing over the trailing ``weight.ndim`` axes.

    Args:
      o: ``[..., *weight.shape]``; gate: the gate's pre-activation, ``o``'s shape in the compute dtype (the output's
        dtype).
      weight: e.g. ``[heads, head_dim]`` (cast to the compute dtype before it multiplies).
      use_kernel: the Pallas-Triton kernels (``kernel_fits`` on the flattened features); None: on GPUs when they
        fit, else jnp with autodiff.
      interpret: run the kernels in Pallas interpret mode (CPU tests).
    """
    if o.shape != gate.shape:
        raise ValueError(f"gated_rms_norm: o {o.shape} and gate {gate.shape} must have the same shape")
    if o.shape[o.ndim - weight.ndim:] != weight.shape:
        raise ValueError(f"gated_rms_norm: weight {weight.shape} must match the trailing axes of o {o.shape}")
    rows = jax.ShapeDtypeStruct((gate.size // weight.size, weight.size), gate.dtype)
    if use_kernel is None:
        # the kernels flatten the feature axes, which a mesh with explicit axes may shard (heads over "tensor")
        use_kernel = jax.default_backend() == "gpu" and kernel_fits(rows) and not _explicitly_sharded(gate)
    if not use_kernel:
        return gated_rms_norm_reference(o, gate, weight, eps)
    if not kernel_fits(rows):
        raise ValueError(f"gated_rms_norm kernels take a power-of-two feature count (product of weight's axes) in "
                         f"[128, 16384] and a row count divisible by {LAUNCH['rows']}; got o {o.shape} {o.dtype}")
    return _gated_rms_norm_kernel(o, gate, weight, eps, interpret)
