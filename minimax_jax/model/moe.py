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


def dropless_experts(x: jax.Array, routing: Routing, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """``sum_k w_k * W2_{e_k}(silu(W1_{e_k} x) * (W3_{e_k} x))`` with no capacity limit.

    The T*k (token, expert) slots are sorted by expert id so that each expert's rows are contiguous, then the three
    matmuls run as grouped matmuls (``jax.lax.ragged_dot``) with group sizes from a bincount, and the results are
    scattered back and combined with the routing weights.

    Args:
      x: ``[T, hidden]``; w1, w3: ``[E, hidden, inter]``; w2: ``[E, inter, hidden]``.
    """
    num_tokens, k = routing.experts.shape
    num_experts = w1.shape[0]
    flat_experts = routing.experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    sorted_x = x[order // k]
    group_sizes = expert_token_counts(flat_experts, num_experts)
    gate = jax.lax.ragged_dot(sorted_x, w1, group_sizes)
    up = jax.lax.ragged_dot(sorted_x, w3, group_sizes)
    sorted_y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w2, group_sizes)
    y = jnp.zeros_like(sorted_y).at[order].set(sorted_y).reshape(num_tokens, k, -1)
    return jnp.einsum("tkd,tk->td", y, routing.weights.astype(y.dtype))


class MoEOutput(NamedTuple):
    output: jax.Array  # [batch, seq, hidden]
    aux_loss: jax.Array  # fp32 scalar, see ``switch_aux_loss``
    expert_counts: jax.Array  # int32 [E], routed token-slots per expert


class MoE(nnx.Module):
    """Router + stacked SwiGLU experts (every layer of MiniMax-Text-01 has one; no shared expert)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden, inter, num_experts = config.hidden_size, config.intermediate_size, config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.dtype = dtype
        self.router = normal_param(rngs, (hidden, num_experts), param_dtype, ("embed", None))
        self.w1 = normal_param(rngs, (num_experts, hidden, inter), param_dtype, ("expert", "embed", "mlp"))
        self.w3 = normal_param(rngs, (num_experts, hidden, inter), param_dtype, ("expert", "embed", "mlp"))
        self.w2 = normal_param(rngs, (num_experts, inter, hidden), param_dtype, ("expert", "mlp", "embed"))

    def __call__(self, x: jax.Array) -> MoEOutput:
        batch, seq, hidden = x.shape
        tokens = x.reshape(batch * seq, hidden).astype(self.dtype)
        routing = route(tokens @ self.router[...].astype(self.dtype), self.num_experts_per_tok)
        y = dropless_experts(tokens, routing, self.w1[...].astype(self.dtype), self.w3[...].astype(self.dtype),
                             self.w2[...].astype(self.dtype))
        counts = expert_token_counts(routing.experts, self.router.shape[-1])
        return MoEOutput(y.reshape(batch, seq, hidden), switch_aux_loss(routing.probs, routing.experts), counts)
