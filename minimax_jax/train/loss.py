"""Next-token cross-entropy from final hidden states, optionally chunked over the sequence.

The chunked form never holds fp32 logits for the whole batch: a scan computes ``[batch, chunk, vocab]`` logits per
chunk, and ``jax.checkpoint`` makes the backward pass recompute them instead of storing every chunk's.
Both forms return the masked *sum* of token losses, so micro-batches add up to the big batch exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def logits_from_hidden(hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
    """fp32 logits ``[..., vocab]`` of final-norm hidden states (matmul in the hidden states' dtype).

    The backward pass casts the fp32 logit gradient to the hidden states' dtype before its two matmuls (as
    mixed-precision training does everywhere else): JAX's own transpose would promote them to fp32 matmuls, which
    with a 65K vocabulary cost more than the whole forward.
    """
    return jnp.einsum("...d,dv->...v", hidden, lm_head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _logits_fwd(hidden, lm_head):
    return logits_from_hidden(hidden, lm_head), (hidden, lm_head)


def _logits_bwd(res, d_logits):
    hidden, lm_head = res
    d_logits = d_logits.astype(hidden.dtype)
    d_hidden = jnp.einsum("...v,dv->...d", d_logits, lm_head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    d_lm_head = jnp.einsum("...d,...v->dv", hidden, d_logits, preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_lm_head.astype(lm_head.dtype)


logits_from_hidden.defvjp(_logits_fwd, _logits_bwd)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """``sum(mask * (logsumexp(logits) - logits[target]))``, fp32 scalar."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    token_losses = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(token_losses * loss_mask.astype(jnp.float32))


def chunked_cross_entropy_sum(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                              *, chunk_size: int) -> jax.Array:
    """``cross_entropy_sum(logits_from_hidden(hidden, lm_head), ...)`` computed ``chunk_size`` positions at a time.

    Args:
      hidden: ``[batch, seq, d]``; lm_head: ``[d, vocab]``; targets int ``[batch, seq]``; loss_mask ``[batch, seq]``.
    """
    batch, seq, dim = hidden.shape
    if seq % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must divide the sequence length {seq}")
    num_chunks = seq // chunk_size

    def split(x):
        return x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(h, t, m):
        return cross_entropy_sum(logits_from_hidden(h, lm_head), t, m)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(loss_mask)))
    return total
