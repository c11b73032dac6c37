"""Mixture of experts of MiniMax-Text-01: softmax router, top-k with renormalization, dropless SwiGLU experts."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model.params_init import normal_param


class Routing(NamedTuple):
    """Router decisions for ``T`` tokens: renormalized top-k weights and expert ids, and the full softmax."""

    weights: jax.Array  # fp32 [T, k], rows sum to 1
    experts: jax.Array  # int32 [T, k]
    probs: jax.Array  # fp32 [T, E]


def route(router_logits: jax.Array, num_experts_per_tok: int) -> Routing:
    """``p = softmax(float32(z))``; top-k of p; the k weights renormalized to sum to one."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, num_experts_per_tok)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32), probs)


def expert_token_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """Number of routed token-slots per expert, int32 ``[E]`` (a token routed to k experts counts once in each)."""
    return jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)


def switch_aux_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
    """Switch-style load-balancing loss ``E * sum_e f_e * P_e``, fp32 scalar.

    ``f_e`` is the fraction of routed token-slots that went to expert e (sums to 1 over experts) and ``P_e`` the mean
    router probability of e over tokens. Perfect balance gives 1. (Hugging Face's ``load_balancing_loss_func``
    counts slots per top-k rank and so returns k times this value.)
    """
    num_experts = probs.shape[-1]
    fractions = expert_token_counts(experts, num_experts).astype(jnp.float32) / experts.size
    mean_probs = jnp.mean(probs.astype(jnp.float32), axis=0)
    return num_experts * jnp.sum(fractions * mean_probs)


def router_z_loss(router_logits: jax.Array) -> jax.Array:
    """Router z-loss ``mean_t logsumexp(z_t)^2`` (ST-MoE), fp32 scalar: keeps router logits small and stable."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)))


def swiglu_grouped(sorted_rows: jax.Array, group_sizes: jax.Array, w1: jax.Array, w3: jax.Array,
                   w2: jax.Array) -> jax.Array:
    """``W2_e(silu(W1_e x) * (W3_e x))`` for rows sorted by expert, as three grouped matmuls (``ragged_dot``).

    Rows past ``sum(group_sizes)`` (padding) come out as zeros. w1, w3: ``[E, hidden, inter]``; w2:
    ``[E, inter, hidden]``; group_sizes: int32 ``[E]``.
    """
    gate = jax.lax.ragged_dot(sorted_rows, w1, group_sizes)
    up = jax.lax.ragged_dot(sorted_rows, w3, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w2, group_sizes)


def combine_slots(sorted_out: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Undo the sort of the T*k slots (``order`` from ``argsort``) and sum each token's k outputs, weighted."""
    num_tokens, k = weights.shape
    y = jnp.zeros_like(sorted_out).at[order].set(sorted_out).reshape(num_tokens, k, -1)
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def dropless_experts(x: jax.Array, routing: Routing, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """``sum_k w_k * W2_{e_k}(silu(W1_{e_k} x) * (W3_{e_k} x))`` with no capacity limit.

    The T*k (token, expert) slots are sorted by expert id so that each expert's rows are contiguous, then the three
    matmuls run as grouped matmuls (``jax.lax.ragged_dot``) with group sizes from a bincount, and the results are
    scattered back and combined with the routing weights.

    Args:
      x: ``[T, hidden]``; w1, w3: ``[E, hidden, inter]``; w2: ``[E, inter, hidden]``.
    """
    k = routing.experts.shape[-1]
    flat_experts = routing.experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = expert_token_counts(flat_experts, w1.shape[0])
    sorted_out = swiglu_grouped(x[order // k], group_sizes, w1, w3, w2)
    return combine_slots(sorted_out, order, routing.weights)


class MoEOutput(NamedTuple):
    output: jax.Array  # [batch, seq, hidden]
    aux_loss: jax.Array  # fp32 scalar, see ``switch_aux_loss`` (over the whole data-parallel group under a mesh)
    expert_counts: jax.Array  # int32 [E], routed token-slots per expert
    z_loss: jax.Array  # fp32 scalar, see ``router_z_loss``


class MoE(nnx.Module):
    """Router + stacked SwiGLU experts (every layer of MiniMax-Text-01 has one; no shared expert).

    Without a mesh (the default) it runs ``dropless_experts`` on one device. Under ``jax.set_mesh(mesh)`` it runs
    ``parallel.expert_parallel.expert_parallel_moe``: the same function, with experts split over the mesh's expert
    axis and router statistics gathered over every device of the data-parallel group.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden, inter, num_experts = config.hidden_size, config.intermediate_size, config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.dtype = dtype
        self.router = normal_param(rngs, (hidden, num_experts), param_dtype, ("embed", None))
        self.w1 = normal_param(rngs, (num_experts, hidden, inter), param_dtype, ("expert", "embed", "mlp"))
        self.w3 = normal_param(rngs, (num_experts, hidden, inter), param_dtype, ("expert", "embed", "mlp"))
        self.w2 = normal_param(rngs, (num_experts, inter, hidden), param_dtype, ("expert", "mlp", "embed"))

    def __call__(self, x: jax.Array) -> MoEOutput:
        router, w1, w3, w2 = (p[...].astype(self.dtype) for p in (self.router, self.w1, self.w3, self.w2))
        x = x.astype(self.dtype)
        if not jax.sharding.get_abstract_mesh().empty:
            from minimax_jax.parallel.expert_parallel import expert_parallel_moe  # parallel/ builds on this module

            y, stats = expert_parallel_moe(x, router, w1, w3, w2, num_experts_per_tok=self.num_experts_per_tok)
            return MoEOutput(y, stats.aux_loss, stats.expert_counts, stats.z_loss)
        batch, seq, hidden = x.shape
        tokens = x.reshape(batch * seq, hidden)
        logits = tokens @ router
        routing = route(logits, self.num_experts_per_tok)
        y = dropless_experts(tokens, routing, w1, w3, w2)
        counts = expert_token_counts(routing.experts, router.shape[-1])
        return MoEOutput(y.reshape(batch, seq, hidden), switch_aux_loss(routing.probs, routing.experts), counts,
                         router_z_loss(logits))
