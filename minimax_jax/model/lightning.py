"""Lightning attention mixer of MiniMax-Text-01 (attention type 0): linear attention with per-head exponential decay.

The recurrence itself is ``pallas_kernels.lightning.lightning_attention``; this module computes its inputs (SiLU'd
q, k, v and the decay rates) and its output path (one RMSNorm over all heads, sigmoid gate, output projection).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels.lightning as lightning_kernels
from minimax_jax.config import LIGHTNING_NORM_EPS, ModelConfig
from minimax_jax.model.explicit_sharding import row_parallel_out_sharding
from minimax_jax.model.params_init import normal_param, ones_param
from pallas_kernels.checkpoint_names import KERNEL_OUTPUT
from pallas_kernels.gated_rms_norm import gated_rms_norm


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes as the official code builds them, fp64 ``[num_heads]``.

    Power-of-two H: ``2 ** (-8 (h + 1) / H)``. Otherwise the ALiBi interleaving fallback: the slopes of the closest
    lower power of two p, then the even-indexed slopes of 2p.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    def slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return power_of_two(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_two(closest) + slopes(2 * closest)[0::2][: n - closest]

    return np.asarray(slopes(num_heads), dtype=np.float64)


def lightning_decay_rates(num_heads: int, layer_index: jax.Array | int, num_layers: int) -> jax.Array:
    """Decay rate per head ``s_{h,l} = slope_h * (1 - l / (L - 1) + 1e-5)``, fp32 ``[num_heads]``.

    ``layer_index`` is the global 0-based layer index (softmax layers count) and may be traced (it comes from the
    scan over layer groups). A one-layer model uses ``l / (L - 1) = 0``.
    """
    slopes = jnp.asarray(alibi_slopes(num_heads), dtype=jnp.float32)
    depth = jnp.asarray(layer_index, jnp.float32) / max(num_layers - 1, 1)
    return slopes * (1.0 - depth + 1e-5)


def lightning_mixer(x: jax.Array, *, qkv_proj: jax.Array, output_gate: jax.Array, norm: jax.Array,
                    out_proj: jax.Array, decay: jax.Array, segment_ids: jax.Array | None,
                    block_size: int | None = None) -> jax.Array:
    """The lightning mixer as a pure function (matmuls in ``x.dtype``).

    Args:
      x: normalized layer input ``[batch, seq, hidden]``.
      qkv_proj: ``[hidden, heads, 3 * head_dim]``, per head the columns are ``[q_h | k_h | v_h]``.
      output_gate: ``[hidden, heads, head_dim]``; norm: ``[heads, head_dim]``; out_proj: ``[heads, head_dim, hidden]``.
      decay: fp32 ``[heads]`` decay rates s_h of this layer.
      block_size: the op's block length (None: the backend's tuned default; it does not change the math).
    """
    q, k, v, gate = lightning_projections(x, qkv_proj, output_gate)
    o = lightning_kernels.lightning_attention(q, k, v, decay, segment_ids=segment_ids, block_size=block_size)
    o = checkpoint_name(o, KERNEL_OUTPUT)  # remat policies may keep it (a Pallas kernel, not an XLA dot)
    return lightning_output(o, gate, norm=norm, out_proj=out_proj)


def lightning_projections(x: jax.Array, qkv_proj: jax.Array,
                          output_gate: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``silu(x @ Wqkv)`` split per head into q, k, v, and the output gate's pre-activation ``x @ Wgate``, each
    ``[batch, seq, heads, head_dim]`` in ``x.dtype``.

    One matmul against the two weights concatenated per head: the backward pass then computes the input gradient
    as one matmul over all four outputs' gradients, where four matmuls wrote four partial gradients that a fusion
    summed (three extra writes and reads of ``[batch, seq, hidden]`` per layer).
    """
    weights = jnp.concatenate([qkv_proj, output_gate], axis=-1).astype(x.dtype)  # per head [q | k | v | gate]
    q, k, v, gate = split_last_axis(jnp.einsum("btd,dhk->bthk", x, weights), 4)
    return jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v), gate


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_last_axis(x: jax.Array, parts: int) -> tuple[jax.Array, ...]:
    """``x`` cut into ``parts`` equal slices of its last axis, whose gradient is one concatenate.

    Autodiff of slicing pads every slice's gradient to full size and adds the pads, which XLA fuses into one slow
    elementwise pass (0.73 ms per lightning layer on an H100 at 8 x 8K); a concatenate gets XLA's copy-per-operand
    emitter, with the gradients' producers fused in.
    """
    width = x.shape[-1] // parts
    return tuple(x[..., i * width:(i + 1) * width] for i in range(parts))


def _split_last_axis_fwd(x, parts):
    return split_last_axis(x, parts), None


def _split_last_axis_bwd(parts, _, grads):
    return (jnp.concatenate(grads, axis=-1),)


split_last_axis.defvjp(_split_last_axis_fwd, _split_last_axis_bwd)


def lightning_output(o: jax.Array, gate: jax.Array, *, norm: jax.Array, out_proj: jax.Array) -> jax.Array:
    """Output path of the mixer: one RMSNorm over all heads, times ``sigmoid(gate)`` (``gate`` is the
    pre-activation), then the output projection."""
    gated = gated_rms_norm(o.astype(gate.dtype), gate, norm, LIGHTNING_NORM_EPS)  # one norm over heads * head_dim
    return jnp.einsum("bthk,hkd->btd", gated, out_proj.astype(gated.dtype),
                      out_sharding=row_parallel_out_sharding(gated))


def lightning_recurrent_step(q: jax.Array, k: jax.Array, v: jax.Array, decay: jax.Array,
                             state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decode token: ``S = exp(-s) S + k^T v; o = q S`` (update first, then read), all in fp32.

    Args:
      q, k, v: ``[batch, heads, head_dim]``; decay: fp32 ``[heads]``; state: fp32 ``[batch, heads, head_dim,
        head_dim]``. Returns ``o`` (q's dtype) and the new state.
    """
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    state = jnp.exp(-decay)[None, :, None, None] * state + k32[..., :, None] * v32[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float32), state, precision=jax.lax.Precision.HIGHEST)
    return o.astype(q.dtype), state


def lightning_mixer_with_state(x: jax.Array, *, qkv_proj: jax.Array, output_gate: jax.Array, norm: jax.Array,
                               out_proj: jax.Array, decay: jax.Array, state: jax.Array, valid: jax.Array | None,
                               block_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The mixer continuing from a cached fp32 state: returns the output and the state after the last position.

    ``valid`` (bool ``[batch, seq]``, optional) marks real tokens; k and v are zeroed elsewhere, so a padding
    position adds nothing to the state (and a zero state stays exactly zero through leading padding). One token
    uses the recurrent form; longer chunks the blocked op, which continues exactly from ``state``.
    """
    q, k, v, gate = lightning_projections(x, qkv_proj, output_gate)
    if valid is not None:
        keep = valid[:, :, None, None]
        k, v = jnp.where(keep, k, jnp.zeros_like(k)), jnp.where(keep, v, jnp.zeros_like(v))
    if x.shape[1] == 1:
        o, state = lightning_recurrent_step(q[:, 0], k[:, 0], v[:, 0], decay, state)
        o = o[:, None]
    else:
        o, state = lightning_kernels.lightning_attention(q, k, v, decay, initial_state=state,
                                                         return_final_state=True, block_size=block_size)
    return lightning_output(o, gate, norm=norm, out_proj=out_proj), state


class LightningMixer(nnx.Module):
    """Thin NNX holder of the lightning mixer's weights; the layer index arrives at call time (scanned)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.num_heads = heads
        self.num_layers = config.num_hidden_layers
        self.dtype = dtype
        self.qkv_proj = normal_param(rngs, (hidden, heads, 3 * head_dim), param_dtype, ("embed", "heads", "qkv_dim"))
        self.output_gate = normal_param(rngs, (hidden, heads, head_dim), param_dtype, ("embed", "heads", "head_dim"))
        self.norm = ones_param((heads, head_dim), param_dtype, ("heads", "head_dim"))
        self.out_proj = normal_param(rngs, (heads, head_dim, hidden), param_dtype, ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, *, layer_index: jax.Array | int,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        decay = lightning_decay_rates(self.num_heads, layer_index, self.num_layers)
        return lightning_mixer(
            x.astype(self.dtype), qkv_proj=self.qkv_proj[...], output_gate=self.output_gate[...],
            norm=self.norm[...], out_proj=self.out_proj[...], decay=decay, segment_ids=segment_ids)

    def call_with_state(self, x: jax.Array, *, layer_index: jax.Array | int, state: jax.Array,
                        valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Cached inference: continue from the fp32 ``state`` ``[batch, heads, head_dim, head_dim]``; returns the
        output and the new state (see ``lightning_mixer_with_state``)."""
        decay = lightning_decay_rates(self.num_heads, layer_index, self.num_layers)
        return lightning_mixer_with_state(
            x.astype(self.dtype), qkv_proj=self.qkv_proj[...], output_gate=self.output_gate[...],
            norm=self.norm[...], out_proj=self.out_proj[...], decay=decay, state=state, valid=valid)
