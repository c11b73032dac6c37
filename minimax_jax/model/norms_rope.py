"""RMSNorm and partial rotary position embeddings (RoPE), as pure functions plus a thin NNX module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.model.params_init import ones_param


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` over the trailing ``weight.ndim`` axes.

    Statistics are computed in fp32; the normalized activations go back to ``x.dtype`` before the weight multiplies
    them, as the reference implementation does.
    """
    axes = tuple(range(x.ndim - weight.ndim, x.ndim))
    xf = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(xf), axis=axes, keepdims=True)
    normed = (xf * jax.lax.rsqrt(variance + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * normed


def rope_inverse_frequencies(rotary_dim: int, theta: float) -> jax.Array:
    """``inv_freq_i = theta ** (-2 i / rotary_dim)`` for i in [0, rotary_dim / 2), in fp32."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return (1.0 / (theta**exponents)).astype(jnp.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """NeoX pairing: ``concat(-x2, x1)`` where x1, x2 are the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_partial_rope(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of each head; the remaining dims pass through unchanged.

    Args:
      x: ``[batch, seq, heads, head_dim]``.
      positions: absolute 0-based positions, int ``[batch, seq]``.
    """
    inv_freq = rope_inverse_frequencies(rotary_dim, theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rotary_dim / 2]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, rotary_dim]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot_f = rot.astype(jnp.float32)
    rotated = rot_f * jnp.cos(emb) + rotate_half(rot_f) * jnp.sin(emb)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale of shape ``shape`` (normalizes over that many trailing axes)."""

    def __init__(self, shape: tuple[int, ...], *, eps: float, axes: tuple[str, ...], param_dtype=jnp.float32):
        self.eps = eps
        self.weight = ones_param(shape, param_dtype, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)
