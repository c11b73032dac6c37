"""Next-token cross-entropy from final hidden states, optionally chunked over the sequence.

The chunked form never holds fp32 logits for the whole batch: a scan computes ``[batch, chunk, vocab]`` logits per
chunk, and when differentiated it computes each chunk's gradients in the same pass (no recomputation).
Both forms return the masked *sum* of token losses, so micro-batches add up to the big batch exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import cross_entropy


@jax.custom_vjp
def logits_from_hidden(hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
    """Logits ``[..., vocab]`` of final-norm hidden states, in the hidden states' dtype (a bf16 model's lm_head gives
    bf16 logits, as in the reference implementation; the loss upcasts them to fp32). The matmul accumulates in fp32
    and writes the compute dtype itself: an fp32 result converted afterwards costs XLA an extra pass over the logits.

    The backward pass casts the fp32 logit gradient to the hidden states' dtype before its two matmuls (as
    mixed-precision training does everywhere else): JAX's own transpose would promote them to fp32 matmuls, which
    with a 65K vocabulary cost more than the whole forward.
    """
    return jnp.einsum("...d,dv->...v", hidden, lm_head.astype(hidden.dtype))


def _logits_fwd(hidden, lm_head):
    return logits_from_hidden(hidden, lm_head), (hidden, lm_head)


def _logits_bwd(res, d_logits):
    hidden, lm_head = res
    d_logits = d_logits.astype(hidden.dtype)
    d_hidden = jnp.einsum("...v,dv->...d", d_logits, lm_head.astype(hidden.dtype))
    d_lm_head = jnp.einsum("...d,...v->dv", hidden, d_logits, preferred_element_type=jnp.float32)
    return d_hidden, d_lm_head.astype(lm_head.dtype)


logits_from_hidden.defvjp(_logits_fwd, _logits_bwd)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """``sum(mask * (logsumexp(logits) - logits[target]))``, fp32 scalar."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logits) * loss_mask.astype(jnp.float32))


def _split_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[batch, seq, ...]`` -> ``[seq // chunk_size, batch, chunk_size, ...]``."""
    batch, seq = x.shape[:2]
    return x.reshape(batch, seq // chunk_size, chunk_size, *x.shape[2:]).swapaxes(0, 1)


def _merge_chunks(x: jax.Array) -> jax.Array:
    """Inverse of ``_split_chunks``."""
    num_chunks, batch, chunk_size = x.shape[:3]
    return x.swapaxes(0, 1).reshape(batch, num_chunks * chunk_size, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_cross_entropy_sum(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                              chunk_size: int) -> jax.Array:
    """``cross_entropy_sum(logits_from_hidden(hidden, lm_head), ...)`` computed ``chunk_size`` positions at a time.

    Never holds more than one chunk's fp32 logits ``[batch, chunk_size, vocab]``. Under differentiation the
    forward pass also computes the gradients of the (scalar) loss, chunk by chunk, while that chunk's logits are at
    hand ("fused linear cross-entropy"); the backward pass only scales them by the incoming cotangent. The logits
    are thus computed once, not recomputed, and the logit gradient goes to the compute dtype in the same pass.

    Args:
      hidden: ``[batch, seq, d]``; lm_head: ``[d, vocab]``; targets int ``[batch, seq]``; loss_mask ``[batch, seq]``;
      chunk_size: must divide seq.
    """
    _check_chunking(hidden, chunk_size)

    def body(total, xs):
        h, t, m = xs
        return total + cross_entropy_sum(logits_from_hidden(h, lm_head), t, m), None

    chunks = tuple(_split_chunks(x, chunk_size) for x in (hidden, targets, loss_mask))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total


def _check_chunking(hidden: jax.Array, chunk_size: int) -> None:
    if hidden.ndim != 3 or hidden.shape[1] % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must divide the sequence length of hidden {hidden.shape}")


def _chunked_fwd(hidden, lm_head, targets, loss_mask, chunk_size):
    _check_chunking(hidden, chunk_size)
    weights = lm_head.astype(hidden.dtype)

    def body(d_lm_head, xs):
        h, t, m = xs
        # in the compute dtype as logits_from_hidden: with bf16, half the bytes for the pass below
        logits = jnp.einsum("bcd,dv->bcv", h, weights)
        row_loss, d_logits = _loss_and_logit_grad(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), m.reshape(-1))
        loss = jnp.sum(row_loss)
        d_logits = d_logits.reshape(logits.shape)
        d_h = jnp.einsum("bcv,dv->bcd", d_logits, weights)
        d_lm_head = d_lm_head + jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32)
        return d_lm_head, (loss, d_h)

    chunks = tuple(_split_chunks(x, chunk_size) for x in (hidden, targets, loss_mask))
    d_lm_head, (losses, d_hidden) = jax.lax.scan(body, jnp.zeros(lm_head.shape, jnp.float32), chunks)
    dtype_token = jnp.zeros((0,), lm_head.dtype)  # residuals must be arrays: carries lm_head's dtype
    return jnp.sum(losses), (_merge_chunks(d_hidden), d_lm_head, dtype_token)


def _loss_and_logit_grad(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row losses and ``d loss / d logits = mask * (softmax - onehot(target))`` (rounded once to the logits' dtype)
    of ``[rows, vocab]`` logits: one Pallas-Triton kernel on GPUs (XLA makes three passes over the logits)."""
    if jax.default_backend() == "gpu" and cross_entropy.kernel_fits(logits):
        return cross_entropy.softmax_cross_entropy_grad_kernel(logits, targets, loss_mask)
    return cross_entropy.softmax_cross_entropy_grad(logits, targets, loss_mask)


def _chunked_bwd(chunk_size, res, g):
    d_hidden, d_lm_head, dtype_token = res
    return ((g * d_hidden.astype(jnp.float32)).astype(d_hidden.dtype), (g * d_lm_head).astype(dtype_token.dtype),
            None, None)


chunked_cross_entropy_sum.defvjp(_chunked_fwd, _chunked_bwd)
