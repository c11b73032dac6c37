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


def tiled_grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, *,
                         tile: int = 128) -> jax.Array:
    """``rows[i] @ weights[e(i)]`` for rows sorted by group, as ONE batched matmul over row tiles.

    The same function as ``jax.lax.ragged_dot`` (rows past ``sum(group_sizes)`` give zeros), for GPUs, where XLA
    lowers ``ragged_dot`` as a dense product with every group (E times the FLOPs). Each group is padded to a multiple
    of ``tile`` rows, so every tile belongs to one group; tiles then multiply their group's weight matrix, gathered
    per tile (``[tiles, in, out]``: fine for the ``small`` preset's experts, large for the released model's).

    Args:
      rows: ``[S, in]``; weights: ``[E, in, out]``; group_sizes: int ``[E]`` with ``sum <= S``.
    """
    num_rows, num_groups = rows.shape[0], weights.shape[0]
    padded_sizes = (group_sizes + tile - 1) // tile * tile
    padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
    starts = jnp.cumsum(group_sizes) - group_sizes
    row_group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(num_rows), side="right")
    in_group = row_group < num_groups
    row_group = jnp.minimum(row_group, num_groups - 1)
    num_tiles = -(-(num_rows + num_groups * (tile - 1)) // tile)  # static bound on the padded length
    dest = jnp.where(in_group, padded_starts[row_group] + jnp.arange(num_rows) - starts[row_group], num_tiles * tile)
    padded = jnp.zeros((num_tiles * tile + 1, rows.shape[1]), rows.dtype).at[dest].set(rows)[:-1]
    tile_group = jnp.searchsorted(jnp.cumsum(padded_sizes), jnp.arange(num_tiles) * tile, side="right")
    tile_weights = weights[jnp.minimum(tile_group, num_groups - 1)]
    out = jnp.einsum("tmi,tio->tmo", padded.reshape(num_tiles, tile, -1), tile_weights)
    out = jnp.concatenate([out.reshape(num_tiles * tile, -1), jnp.zeros((1, out.shape[-1]), out.dtype)])
    return out[dest]


def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul of sorted rows: ``ragged_dot`` (CPU, TPU), ``tiled_grouped_matmul`` on GPU (see there)."""
    if jax.default_backend() == "gpu":
        return tiled_grouped_matmul(rows, weights, group_sizes)
    return jax.lax.ragged_dot(rows, weights, group_sizes)


def swiglu_grouped(sorted_rows: jax.Array, group_sizes: jax.Array, w1: jax.Array, w3: jax.Array,
                   w2: jax.Array) -> jax.Array:
    """``W2_e(silu(W1_e x) * (W3_e x))`` for rows sorted by expert, as three grouped matmuls.

    Rows past ``sum(group_sizes)`` (padding) come out as zeros. w1, w3: ``[E, hidden, inter]``; w2:
    ``[E, inter, hidden]``; group_sizes: int32 ``[E]``.
    """
    gate = grouped_matmul(sorted_rows, w1, group_sizes)
    up = grouped_matmul(sorted_rows, w3, group_sizes)
    return grouped_matmul(jax.nn.silu(gate) * up, w2, group_sizes)


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
