"""The train step: loss, gradient accumulation over micro-batches, clipping + AdamW, a non-finite guard.

The train state is a plain pytree ``{"params", "opt_state", "step", "rng"}``: ``params`` is the pure nested dict
of the model's ``nnx.Param`` values (fp32 master weights), merged with the model's graphdef inside the step. The
step differentiates with respect to a copy whose matmul weights are already in the compute dtype
(``cast_matmul_weights``), so their gradients stay in that dtype until the update; the forward pass casts the rest.
``rng`` is a raw uint32 key (``jax.random.key_data``), folded with the step for stochastic layers (the released
model has none; it is carried and checkpointed so that one added later resumes exactly).

The objective of a step is ``sum(masked token CE) / sum(loss_mask) + router_aux_loss_coef * mean(aux)`` where
``aux`` is the per-layer Switch loss (1 at perfect balance) averaged over layers and micro-batches. Each
micro-batch contributes its CE *sum* divided by the token count of the whole batch, so accumulating gradients
over micro-batches gives the big batch's gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minimax_jax.model.transformer import cast_matmul_weights
from minimax_jax.train.loss import chunked_cross_entropy_sum, cross_entropy_sum, logits_from_hidden
from minimax_jax.train.optimizer import update_count

Batch = dict[str, jax.Array]
TrainState = dict[str, Any]


def init_train_state(params: dict, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh train state for ``params`` (pure dict of arrays)."""
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def make_loss_fn(graphdef: nnx.GraphDef, *, remat_policy: str, loss_chunk_size: int | None,
                 aux_loss_coef: float, scan_layers: bool = True) -> Callable:
    """``loss_fn(params, micro_batch, num_tokens) -> (objective, (ce_sum, aux_loss, expert_counts))``."""

    def loss_fn(params, batch: Batch, num_tokens: jax.Array):
        model = nnx.merge(graphdef, params)
        hidden, stats = model.hidden_states(batch["inputs"], segment_ids=batch["segment_ids"],
                                            positions=batch["positions"], remat_policy=remat_policy,
                                            scan_layers=scan_layers)
        lm_head = model.lm_head[...]
        with jax.named_scope("loss"):
            if loss_chunk_size is None:
                ce_sum = cross_entropy_sum(logits_from_hidden(hidden, lm_head), batch["targets"],
                                           batch["loss_mask"])
            else:
                ce_sum = chunked_cross_entropy_sum(hidden, lm_head, batch["targets"], batch["loss_mask"],
                                                   chunk_size=loss_chunk_size)
        aux = jnp.mean(stats.aux_loss)
        objective = ce_sum / num_tokens + aux_loss_coef * aux
        return objective, (ce_sum, aux, stats.expert_counts)

    return loss_fn


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum_steps: int = 1, remat_policy: str = "none", loss_chunk_size: int | None = None,
                    aux_loss_coef: float = 0.0, skip_nonfinite: bool = True, scan_layers: bool = True) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` (not jitted; see ``jit_train_step``).

    ``batch`` holds ``[global_batch, seq]`` arrays; with ``grad_accum_steps`` A the step scans over A micro-batches
    of ``global_batch // A`` rows. Metrics: ``loss`` (token-mean CE), ``aux_loss``, ``grad_norm`` (before
    clipping), ``learning_rate``, ``tokens`` (loss tokens), ``skipped`` (1 when the update was dropped as
    non-finite) and ``expert_counts`` ``[layers, experts]``.
    """
    optimizer = optax.with_extra_args_support(optimizer)  # update() gets the step's grad norm as ``global_norm``
    loss_fn = make_loss_fn(graphdef, remat_policy=remat_policy, loss_chunk_size=loss_chunk_size,
                           aux_loss_coef=aux_loss_coef, scan_layers=scan_layers)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def accumulate(compute_params, params, batch: Batch, num_tokens):
        if grad_accum_steps == 1:
            grads, (ce_sum, aux, counts) = grad_fn(compute_params, batch, num_tokens)
            return grads, ce_sum, aux, counts
        micro = jax.tree.map(lambda x: _split_micro_batches(x, grad_accum_steps), batch)

        def body(carry, micro_batch):
            grads_acc, ce_acc, aux_acc, counts_acc = carry
            grads, (ce_sum, aux, counts) = grad_fn(compute_params, micro_batch, num_tokens)
            with jax.named_scope("grad_accumulation"):
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, ce_acc + ce_sum, aux_acc + aux / grad_accum_steps, counts_acc + counts), None

        first = jax.tree.map(lambda x: x[0], micro)
        counts_shape = jax.eval_shape(grad_fn, compute_params, first, num_tokens)[1][2]
        # the sums are kept in the master weights' dtype (fp32), not in the compute dtype of the matmul weights
        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                 jnp.zeros(counts_shape.shape, counts_shape.dtype))
        (grads, ce_sum, aux, counts), _ = jax.lax.scan(body, zeros, micro)
        return grads, ce_sum, aux, counts

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        params, opt_state = state["params"], state["opt_state"]
        num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        # matmul weights' gradients stay in the compute dtype until the update: half the bytes written and read
        compute_params = cast_matmul_weights(params, nnx.merge(graphdef, params).dtype)
        grads, ce_sum, aux, counts = accumulate(compute_params, params, batch, num_tokens)
        loss = ce_sum / num_tokens
        with jax.named_scope("grad_norm"):
            grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(aux)

        @jax.named_scope("optimizer")
        def update(operands):
            params_, opt_state_, grads_ = operands
            grads_ = jax.tree.map(lambda g, p: g.astype(p.dtype), grads_, params_)
            updates, opt_state_ = optimizer.update(grads_, opt_state_, params_, global_norm=grad_norm)
            return optax.apply_updates(params_, updates), opt_state_

        if skip_nonfinite:
            # a conditional, not a select over the whole state: selecting costs an extra pass over params and
            # optimizer state every step (7% of the small preset's step on an H100)
            new_params, new_opt_state = jax.lax.cond(finite, update, lambda operands: operands[:2],
                                                     (params, opt_state, grads))
        else:
            new_params, new_opt_state = update((params, opt_state, grads))
        metrics = {
            "loss": loss, "aux_loss": aux, "grad_norm": grad_norm,
            "learning_rate": schedule(_or(update_count(opt_state), state["step"])), "tokens": num_tokens,
            "skipped": (~finite).astype(jnp.int32) if skip_nonfinite else jnp.zeros((), jnp.int32),
            "expert_counts": counts,
        }
        new_state = {"params": new_params, "opt_state": new_opt_state, "step": state["step"] + 1,
                     "rng": state["rng"]}
        return new_state, metrics

    return train_step


def _or(value, default):
    return default if value is None else value


def _split_micro_batches(x: jax.Array, num_micro: int) -> jax.Array:
    """``[B, ...]`` -> ``[num_micro, B // num_micro, ...]``; micro-batch m takes rows m, m + A, m + 2A, ...

    Interleaving keeps every micro-batch spread over all data-parallel shards of the batch dimension.
    """
    rows = x.shape[0]
    return x.reshape(rows // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)


def jit_train_step(train_step: Callable, state_sharding: Any, batch_sharding: Any, replicated: Any) -> Callable:
    """``jax.jit`` with explicit input/output shardings; the old state's buffers are donated."""
    return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
