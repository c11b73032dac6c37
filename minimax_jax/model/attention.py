"""Softmax attention layers of MiniMax-Text-01: GQA, partial RoPE, causal, optional packed-sequence segments."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model.norms_rope import apply_partial_rope
from minimax_jax.model.params_init import normal_param


def segment_index(segment_ids: jax.Array) -> jax.Array:
    """Contiguous-run index of user segment ids ``[batch, seq]``: +1 wherever the id changes (``0 0 1 1 0`` -> three
    segments), the same convention as ``pallas_kernels.lightning`` so that both mixers see the same segments."""
    starts = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(starts[:, :1]), jnp.cumsum(starts, axis=1)], axis=1)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Boolean ``[batch, 1, seq, seq]`` mask: True where query and key lie in the same segment (contiguous run)."""
    index = segment_index(segment_ids)
    same = index[:, :, None] == index[:, None, :]
    return same[:, None, :, :]


def causal_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
                         implementation: str | None = None) -> jax.Array:
    """Causal softmax attention with scale ``1/sqrt(head_dim)`` and the softmax in fp32.

    Args:
      q: ``[batch, seq, heads, head_dim]``; k, v: ``[batch, seq, kv_heads, head_dim]`` (not repeated: query head h
        reads kv head ``h // (heads / kv_heads)``, which ``jax.nn.dot_product_attention`` does natively).
      segment_ids: optional int ``[batch, seq]``; a token attends only to earlier tokens of its own segment (a
        contiguous run of equal ids).
      implementation: passed to ``jax.nn.dot_product_attention`` (None lets JAX choose; 'cudnn' forces cuDNN).
    """
    mask = None if segment_ids is None else segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]), is_causal=True,
                                        implementation=implementation)


class SoftmaxAttention(nnx.Module):
    """The softmax mixer (attention type 1): q/k/v projections, partial RoPE on q and k, GQA, output projection."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)
        self.rotary_dim = config.rotary_dim
        self.rope_theta = config.rope_theta
        self.dtype = dtype
        self.q_proj = normal_param(rngs, (hidden, heads, head_dim), param_dtype, ("embed", "heads", "head_dim"))
        self.k_proj = normal_param(rngs, (hidden, kv_heads, head_dim), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.v_proj = normal_param(rngs, (hidden, kv_heads, head_dim), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.o_proj = normal_param(rngs, (heads, head_dim, hidden), param_dtype, ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(self.dtype))
        k = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(self.dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(self.dtype))
        q = apply_partial_rope(q, positions, rotary_dim=self.rotary_dim, theta=self.rope_theta)
        k = apply_partial_rope(k, positions, rotary_dim=self.rotary_dim, theta=self.rope_theta)
        o = causal_gqa_attention(q, k, v, segment_ids=segment_ids)
        return jnp.einsum("bthk,hkd->btd", o, self.o_proj[...].astype(self.dtype))
