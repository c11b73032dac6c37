"""Mixture of experts of MiniMax-Text-01: softmax router, top-k with renormalization, dropless SwiGLU experts."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from minimax_jax.config import ModelConfig
from minimax_jax.model.moe_dispatch import combine_rows, tile_layout, to_rows
from minimax_jax.model.params_init import normal_param
from pallas_kernels.checkpoint_names import KERNEL_OUTPUT
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_swiglu, tile_rows


class Routing(NamedTuple):
    """Router decisions for ``T`` tokens: renormalized top-k weights and expert ids, and the full softmax."""

    weights: jax.Array  # fp32 [T, k], rows sum to 1
    experts: jax.Array  # int32 [T, k]
    probs: jax.Array  # fp32 [T, E]


def top_k_by_argmax(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k`` over the last axis as ``k`` rounds of max and argmax (ties: the lower index first, as
    ``top_k``): a few small reductions over the router's experts, where the sort-based ``top_k`` took 0.2 ms per MoE
    layer of 64K tokens on an H100."""
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    values, indices = [], []
    for _ in range(k):
        best = jnp.argmax(x, axis=-1).astype(jnp.int32)
        values.append(jnp.take_along_axis(x, best[..., None], axis=-1)[..., 0])
        indices.append(best)
        x = jnp.where(index == best[..., None], -jnp.inf, x)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def route(router_logits: jax.Array, num_experts_per_tok: int) -> Routing:
    """``p = softmax(float32(z))``; top-k of p; the k weights renormalized to sum to one."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = top_k_by_argmax(probs, num_experts_per_tok)
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


def expert_swiglu(rows: jax.Array, tile_group: jax.Array, w13: jax.Array, w2: jax.Array, row_weight: jax.Array, *,
                  tile: int, backend: str = "auto") -> jax.Array:
    """``W2_e(w * silu(W1_e x) * (W3_e x))`` on a tile-aligned layout: row tile i belongs to expert ``tile_group[i]``
    and row r has weight ``row_weight[r]`` (its routing weight, applied before W2: W2 is linear, and the weights'
    gradient then comes from the SwiGLU's backward pass without keeping the expert outputs).

    W1 and W3 run as one grouped matmul of twice the width (one pass over the rows), with the weighted SwiGLU fused
    into it on Hopper (``grouped_swiglu``). w13: ``[E, 2, hidden, inter]`` (``w13[e, 0]`` is W1_e, ``w13[e, 1]``
    W3_e, each as ``[hidden, inter]``); w2: ``[E, inter, hidden]``; rows ``[R, hidden]``, row_weight fp32 ``[R]``;
    padding rows give zeros.
    """
    hidden = grouped_swiglu(rows, w13, tile_group, row_weight, tile=tile, backend=backend)
    # kept by the dots_and_kernel_outputs remat policy: the residual stream after the MoE is rebuilt from it
    return checkpoint_name(grouped_matmul(hidden, w2, tile_group, tile=tile, backend=backend), KERNEL_OUTPUT)


def dropless_experts(x: jax.Array, routing: Routing, w13: jax.Array, w2: jax.Array, *,
                     backend: str = "auto") -> jax.Array:
    """``sum_k w_k * W2_{e_k}(silu(W1_{e_k} x) * (W3_{e_k} x))`` with no capacity limit.

    The T*k (token, expert) slots are placed by expert on a tile-aligned layout (``moe_dispatch``), with their
    routing weights; the experts run as grouped matmuls (``pallas_kernels.grouped_matmul``: Mosaic-GPU kernels on
    Hopper, Pallas-Triton on other GPUs, ``ragged_dot`` elsewhere), and each token's k weighted results are summed.

    Args:
      x: ``[T, hidden]``; w13: ``[E, 2, hidden, inter]`` (W1 and W3 stacked); w2: ``[E, inter, hidden]``.
      backend: the grouped-matmul backend (``pallas_kernels.grouped_matmul.BACKENDS``).
    """
    k, tile = routing.experts.shape[-1], tile_rows(backend)
    with jax.named_scope("dispatch"):
        layout = tile_layout(routing.experts.reshape(-1), w13.shape[0], tile)
        rows = to_rows(x, layout, k)
        row_weight = to_rows(routing.weights.reshape(-1, 1), layout, 1)[:, 0]
    with jax.named_scope("experts"):
        out = expert_swiglu(rows, layout.tile_group, w13, w2, row_weight, tile=tile, backend=backend)
    with jax.named_scope("combine"):
        return combine_rows(out, layout, k)


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
        # W1 (gate) and W3 (up) of each expert stacked: the grouped matmul reads both in one pass, no copy
        self.w13 = normal_param(rngs, (num_experts, 2, hidden, inter), param_dtype, ("expert", None, "embed", "mlp"))
        self.w2 = normal_param(rngs, (num_experts, inter, hidden), param_dtype, ("expert", "mlp", "embed"))

    def __call__(self, x: jax.Array) -> MoEOutput:
        router, w13, w2 = (p[...].astype(self.dtype) for p in (self.router, self.w13, self.w2))
        x = x.astype(self.dtype)
        if not jax.sharding.get_abstract_mesh().empty:
            from minimax_jax.parallel.expert_parallel import expert_parallel_moe  # parallel/ builds on this module

            y, stats = expert_parallel_moe(x, router, w13, w2, num_experts_per_tok=self.num_experts_per_tok)
            return MoEOutput(y, stats.aux_loss, stats.expert_counts, stats.z_loss)
        batch, seq, hidden = x.shape
        tokens = x.reshape(batch * seq, hidden)
        with jax.named_scope("router"):
            logits = tokens @ router
            routing = route(logits, self.num_experts_per_tok)
            counts = expert_token_counts(routing.experts, router.shape[-1])
            aux_loss, z_loss = switch_aux_loss(routing.probs, routing.experts), router_z_loss(logits)
        y = dropless_experts(tokens, routing, w13, w2)
        return MoEOutput(y.reshape(batch, seq, hidden), aux_loss, counts, z_loss)
