"""Expert-parallel dropless MoE inside ``jax.shard_map``: experts split over the expert axis, tokens travel to their
experts' devices and back by ragged all-to-all (``parallel/ragged_collectives.py``); the expert hidden (``mlp``)
dimension is optionally split over the tensor axis.

Per device: route the local tokens, sort the (token, expert) slots by expert id, send each device the contiguous
slice for its experts (``jax.lax.ragged_all_to_all``), sort the received rows by local expert, run the grouped
matmuls (``jax.lax.ragged_dot``), undo both permutations on the way back and combine with the top-k weights. The
receive buffer holds the worst case (every token of the expert group choosing this device), so nothing is ever
dropped. Router statistics (aux loss, z-loss, expert counts) are summed over every device that holds different
tokens, so the load-balancing loss balances the whole data-parallel group (the paper's global router), and equals
the single-device value on the same global batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minimax_jax.model.moe import (
    Routing,
    dropless_experts,
    expert_swiglu,
    expert_token_counts,
    route,
)
from minimax_jax.model.moe_dispatch import combine_slots, from_rows, tile_layout, to_rows
from minimax_jax.parallel.ragged_collectives import ragged_all_to_all
from minimax_jax.parallel.sharding import LOGICAL_AXIS_RULES, MeshAxes, ShardingError, check_divisible, mesh_axes_for
from pallas_kernels.grouped_matmul import tile_rows


class ExpertParallelAxes(NamedTuple):
    """Which mesh axes hold what, read from the logical axis rules for the current mesh."""

    batch: tuple[str, ...]  # token batch dimension
    seq: tuple[str, ...]  # token sequence dimension
    expert: tuple[str, ...]  # experts (must be among the token axes)
    tensor: tuple[str, ...]  # expert hidden dimension

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every axis over which devices hold different tokens (router statistics are summed over these)."""
        return self.batch + self.seq


def expert_parallel_axes(mesh: jax.sharding.AbstractMesh,
                         rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> ExpertParallelAxes:
    """Read the axes from the rules; the expert axes must also split the tokens (else tokens would be duplicated)."""
    axes = ExpertParallelAxes(mesh_axes_for("batch", mesh, rules), mesh_axes_for("seq", mesh, rules),
                              mesh_axes_for("expert", mesh, rules), mesh_axes_for("mlp", mesh, rules))
    if not set(axes.expert) <= set(axes.tokens):
        raise ShardingError(f"expert mesh axes {axes.expert} must also split the tokens (batch axes {axes.batch}, "
                            f"sequence axes {axes.seq}) for expert parallelism")
    if set(axes.tensor) & set(axes.tokens):
        raise ShardingError(f"tensor mesh axes {axes.tensor} of the expert hidden dimension must not split tokens")
    return axes


class RouterStatistics(NamedTuple):
    aux_loss: jax.Array  # fp32 scalar, Switch-style ``E * sum_e f_e P_e`` over all tokens of the group
    z_loss: jax.Array  # fp32 scalar, ``mean(logsumexp(z)^2)`` over all tokens of the group
    expert_counts: jax.Array  # int32 [E], routed token-slots per expert over the group


def global_router_statistics(router_logits: jax.Array, routing: Routing,
                             token_axes: tuple[str, ...]) -> RouterStatistics:
    """Router statistics over all tokens of the devices along ``token_axes`` (call inside ``shard_map``)."""
    num_tokens, num_experts = routing.probs.shape
    group = math.prod(jax.lax.axis_size(a) for a in token_axes)
    psum = (lambda v: jax.lax.psum(v, token_axes)) if token_axes else (lambda v: v)
    counts = psum(expert_token_counts(routing.experts, num_experts))
    prob_sums = psum(jnp.sum(routing.probs, axis=0))
    z_sum = psum(jnp.sum(jnp.square(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1))))
    total_tokens = num_tokens * group
    fractions = counts.astype(jnp.float32) / (total_tokens * routing.experts.shape[-1])
    aux = num_experts * jnp.sum(fractions * (prob_sums / total_tokens))
    return RouterStatistics(aux, z_sum / total_tokens, counts)


def _exclusive_cumsum(x: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _rows_by_local_expert(recv_counts: jax.Array, num_rows: int) -> jax.Array:
    """Local expert id of each received row (rows arrive grouped by source, then by expert); padding gets E_l."""
    num_sources, local_experts = recv_counts.shape
    ids = jnp.concatenate([jnp.tile(jnp.arange(local_experts, dtype=jnp.int32), num_sources),
                           jnp.asarray([local_experts], jnp.int32)])
    repeats = jnp.concatenate([recv_counts.reshape(-1), (num_rows - jnp.sum(recv_counts)).reshape(1)])
    return jnp.repeat(ids, repeats, total_repeat_length=num_rows)


def all_to_all_experts(sorted_rows: jax.Array, group_sizes: jax.Array, w13: jax.Array, w2: jax.Array,
                       expert_axis: str) -> jax.Array:
    """SwiGLU experts for rows sorted by global expert id, experts split over ``expert_axis`` (inside shard_map).

    Args:
      sorted_rows: ``[R, hidden]`` this device's (token, expert) slots, sorted by expert id.
      group_sizes: int32 ``[E]`` rows per global expert on this device.
      w13: local experts' W1 and W3 ``[E_l, 2, hidden, inter_l]``; w2: ``[E_l, inter_l, hidden]``.
    Returns:
      ``[R, hidden]`` expert outputs in the order of ``sorted_rows`` (partial sums if inter is split).
    """
    num_devices = jax.lax.axis_size(expert_axis)
    me = jax.lax.axis_index(expert_axis)
    local_experts = w13.shape[0]
    num_rows = sorted_rows.shape[0]
    per_device = group_sizes.reshape(num_devices, local_experts)  # [dst, E_l]
    all_sizes = jax.lax.all_gather(per_device, expert_axis)  # [src, dst, E_l]
    traffic = jnp.sum(all_sizes, axis=-1)  # [src, dst] rows sent from src to dst
    send_sizes, recv_sizes = traffic[me], traffic[:, me]
    send_offsets = _exclusive_cumsum(send_sizes, 0)
    recv_offsets = _exclusive_cumsum(recv_sizes, 0)
    offsets_on_dst = _exclusive_cumsum(traffic, 0)[me]  # where my rows land on each destination
    offsets_on_src = _exclusive_cumsum(traffic, 1)[:, me]  # where each source keeps the rows it sent me

    capacity = num_devices * num_rows  # worst case: every slot of every device routed here
    received = ragged_all_to_all(
        sorted_rows, jnp.zeros((capacity, sorted_rows.shape[1]), sorted_rows.dtype), send_offsets, send_sizes,
        offsets_on_dst, recv_sizes, axis_name=expert_axis)
    recv_counts = all_sizes[:, me, :]  # [src, E_l]
    tile = tile_rows()
    layout = tile_layout(_rows_by_local_expert(recv_counts, capacity), local_experts, tile)
    # routing weights are applied after the return trip (combine_slots): rows here are weighted by one
    ones = jnp.ones(layout.slot_of_row.shape, jnp.float32)
    out = from_rows(expert_swiglu(to_rows(received, layout, 1), layout.tile_group, w13, w2, ones, tile=tile), layout)
    return ragged_all_to_all(
        out, jnp.zeros_like(sorted_rows), recv_offsets, recv_sizes, offsets_on_src, send_sizes,
        axis_name=expert_axis)


def _local_moe(x: jax.Array, router: jax.Array, w13: jax.Array, w2: jax.Array, *,
               num_experts_per_tok: int, axes: ExpertParallelAxes):
    batch, seq, hidden = x.shape
    tokens = x.reshape(batch * seq, hidden)
    logits = tokens @ router
    routing = route(logits, num_experts_per_tok)
    stats = global_router_statistics(logits, routing, axes.tokens)
    if axes.expert:
        (expert_axis,) = axes.expert
        flat_experts = routing.experts.reshape(-1)
        order = jnp.argsort(flat_experts, stable=True)
        sorted_rows = tokens[order // num_experts_per_tok]
        group_sizes = expert_token_counts(flat_experts, router.shape[-1])
        sorted_out = all_to_all_experts(sorted_rows, group_sizes, w13, w2, expert_axis)
        slot_out = jnp.zeros_like(sorted_out).at[order].set(sorted_out, unique_indices=True)
        y = combine_slots(slot_out, routing.weights)
    else:
        y = dropless_experts(tokens, routing, w13, w2)
    if axes.tensor:
        y = jax.lax.psum(y, axes.tensor)  # partial sums over the split expert hidden dimension
    return y.reshape(batch, seq, hidden), stats


def _to_spec(x: jax.Array, spec: P, mesh: jax.sharding.AbstractMesh) -> jax.Array:
    """Explicit-sharding meshes need the argument in the shard_map's layout already; Auto meshes reshard alone."""
    return jax.sharding.reshard(x, spec) if mesh.are_all_axes_explicit else x


def expert_parallel_moe(x: jax.Array, router: jax.Array, w13: jax.Array, w2: jax.Array, *,
                        num_experts_per_tok: int, mesh: jax.sharding.AbstractMesh | None = None,
                        rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> tuple[jax.Array, RouterStatistics]:
    """Dropless MoE of ``x [batch, seq, hidden]`` on the current (or given) mesh; same math as ``moe.MoE``.

    Args:
      router: ``[hidden, E]``; w13: ``[E, 2, hidden, inter]`` (W1 and W3 stacked); w2: ``[E, inter, hidden]`` (all
        in compute dtype).
    Returns:
      The output ``[batch, seq, hidden]`` (sharded like the tokens) and the group-wide router statistics.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    axes = expert_parallel_axes(mesh, rules)
    if len(axes.expert) > 1:
        raise ShardingError(f"experts may be split over one mesh axis, got {axes.expert}")
    check_divisible("MoE input", x.shape, ("batch", "seq", None), mesh, rules)
    num_experts = router.shape[-1]
    expert_ways = math.prod(mesh.shape[a] for a in axes.expert)
    if num_experts % expert_ways:
        raise ShardingError(f"num_local_experts={num_experts} is not divisible by mesh axis "
                            f"{axes.expert[0]!r} of size {expert_ways}")

    def entry(names: tuple[str, ...]):
        return None if not names else names[0] if len(names) == 1 else names

    batch, seq, expert, tensor = (entry(a) for a in axes)
    in_specs = (P(batch, seq, None), P(None, None), P(expert, None, None, tensor), P(expert, tensor, None))
    args = tuple(_to_spec(a, s, mesh) for a, s in zip((x, router, w13, w2), in_specs, strict=True))
    stats_specs = RouterStatistics(P(), P(), P())
    fn = jax.shard_map(lambda *a: _local_moe(*a, num_experts_per_tok=num_experts_per_tok, axes=axes),
                       mesh=mesh, in_specs=in_specs, out_specs=(P(batch, seq, None), stats_specs))
    return fn(*args)


__all__ = ["ExpertParallelAxes", "RouterStatistics", "all_to_all_experts", "expert_parallel_axes",
           "expert_parallel_moe", "global_router_statistics"]
