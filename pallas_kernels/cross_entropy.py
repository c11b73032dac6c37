"""Softmax cross-entropy of a block of logits and its gradient, in two reads of the logits and one write.

For logits ``[R, V]``, integer targets ``[R]`` and a loss mask ``[R]``, ``softmax_cross_entropy_grad`` returns
each row's masked loss ``mask * (logsumexp(x) - x[target])`` (fp32) and the logit gradient
``mask * (softmax(x) - onehot(target))`` in the logits' dtype. The fused linear cross-entropy of
``minimax_jax/train/loss.py`` needs both for every chunk of logits.

XLA computes them in three passes over the logits (row max, row sum of exponentials, gradient), each at memory
bandwidth: with a 65K vocabulary they cost a quarter of the loss's time. The Pallas-Triton kernel gives each row
one program, which walks the row once for an online max and sum over vocabulary tiles, then again, in reverse tile
order, for the gradient: two reads and one write instead of three reads and one write. (On an H100 the second
read comes from HBM, not L2: a sweep over how many rows are in flight at once found no setting where it did.)
It overwrites the logits with the gradient.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Widest vocabulary tile and Triton warps of the one-row programs (H100 sweep, scripts/bench_loss.py --sweep).
LAUNCH = {"max_tile": 16384, "num_warps": 16}
_MIN_TILE = 128  # a vocabulary whose largest power-of-two divisor is smaller goes through XLA


def softmax_cross_entropy_grad(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
                               ) -> tuple[jax.Array, jax.Array]:
    """``(row_loss fp32 [R], d_logits [R, V])`` in ``jnp`` (the module docstring defines them)."""
    x = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(x, axis=-1)
    is_target = jnp.arange(x.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    target_logits = jnp.sum(jnp.where(is_target, x, 0.0), axis=-1)
    mask = loss_mask.astype(jnp.float32)
    d_logits = (jnp.exp(x - log_normalizer[..., None]) - is_target) * mask[..., None]
    return mask * (log_normalizer - target_logits), d_logits.astype(logits.dtype)


def _vocab_tile(vocab: int) -> int:
    """The largest power of two that divides ``vocab``, capped at ``LAUNCH["max_tile"]``."""
    return math.gcd(vocab, LAUNCH["max_tile"])


def kernel_fits(logits: jax.Array) -> bool:
    """Whether ``softmax_cross_entropy_grad_kernel`` takes ``logits``: 2-D, with a vocabulary divisible by a
    power-of-two tile of at least 128."""
    return logits.ndim == 2 and _vocab_tile(logits.shape[1]) >= _MIN_TILE


def _kernel(logits_ref, targets_ref, mask_ref, row_loss_ref, d_logits_ref, *, tile, num_tiles):
    row = pl.ds(pl.program_id(0), 1)
    target = targets_ref[row]
    columns = jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)

    def tile_of(j):
        return logits_ref[row, pl.ds(j * tile, tile)].astype(jnp.float32)

    def statistics(j, carry):  # running max, sum of exp(x - max), target logit
        row_max, exp_sum, target_logit = carry
        x = tile_of(j)
        new_max = jnp.maximum(row_max, jnp.max(x, axis=1))
        exp_sum = exp_sum * jnp.exp(row_max - new_max) + jnp.sum(jnp.exp(x - new_max[:, None]), axis=1)
        hit = columns + j * tile == target[:, None]
        return new_max, exp_sum, target_logit + jnp.sum(jnp.where(hit, x, 0.0), axis=1)

    zero = jnp.zeros((1,), jnp.float32)
    row_max, exp_sum, target_logit = jax.lax.fori_loop(
        0, num_tiles, statistics, (jnp.full((1,), -jnp.inf, jnp.float32), zero, zero))
    log_normalizer = row_max + jnp.log(exp_sum)
    mask = mask_ref[row]
    row_loss_ref[row] = mask * (log_normalizer - target_logit)

    def gradient(i, carry):
        j = num_tiles - 1 - i  # the tiles read last first: the likeliest to be in L2 still
        x = tile_of(j)
        is_target = (columns + j * tile == target[:, None]).astype(jnp.float32)
        d = (jnp.exp(x - log_normalizer[:, None]) - is_target) * mask[:, None]
        d_logits_ref[row, pl.ds(j * tile, tile)] = d.astype(d_logits_ref.dtype)
        return carry

    jax.lax.fori_loop(0, num_tiles, gradient, 0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def softmax_cross_entropy_grad_kernel(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
                                      interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``softmax_cross_entropy_grad`` as one Pallas-Triton kernel (see ``kernel_fits``); ``d_logits`` takes the
    logits' buffer."""
    if not kernel_fits(logits):
        raise ValueError(f"softmax_cross_entropy_grad_kernel: logits {logits.shape} need 2 axes and a vocabulary "
                         f"divisible by a power of two >= {_MIN_TILE}")
    rows, vocab = logits.shape
    tile = _vocab_tile(vocab)
    kernel = functools.partial(_kernel, tile=tile, num_tiles=vocab // tile)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct(logits.shape, logits.dtype)),
        grid=(rows,),
        input_output_aliases={0: 1},
        compiler_params=pltriton.CompilerParams(num_warps=LAUNCH["num_warps"], num_stages=1),
        interpret=interpret,
        name="softmax_cross_entropy_grad",
    )(logits, targets.astype(jnp.int32), loss_mask.astype(jnp.float32))
