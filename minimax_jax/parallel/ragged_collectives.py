"""``ragged_all_to_all`` for every backend: XLA's collective where it exists (GPU, TPU), a plain-JAX reference
built from ``all_gather`` elsewhere (XLA:CPU has no ragged-all-to-all; the reference lets CPU meshes test the
expert-parallel path with the same offsets and sizes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.manual_axes import to_varying, union_axes


def ragged_all_to_all_reference(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                                send_sizes: jax.Array, output_offsets: jax.Array, recv_sizes: jax.Array, *,
                                axis_name: str) -> jax.Array:
    """Same contract as ``jax.lax.ragged_all_to_all`` with one slice per device (call inside ``shard_map``).

    Every device gathers all operands and the slice table, then picks for each of its output rows the source row
    that lands there. Costs an all-gather of the operand: for tests and small meshes, not for production.
    ``recv_sizes`` is implied by the gathered table and only checked for shape.
    """
    num_devices = jax.lax.axis_size(axis_name)
    if input_offsets.shape != (num_devices,) or recv_sizes.shape != (num_devices,):
        raise ValueError(f"reference ragged_all_to_all supports one slice per device ({num_devices}), got "
                         f"{input_offsets.shape[0]}")
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [src, rows_in, ...]
    src_starts, sizes, dst_starts = (jax.lax.all_gather(a, axis_name)[:, me]
                                     for a in (input_offsets, send_sizes, output_offsets))  # [src]
    rows = jnp.arange(output.shape[0])[:, None]
    hits = (rows >= dst_starts) & (rows < dst_starts + sizes)  # [rows_out, src]
    source = jnp.argmax(hits, axis=1)
    source_row = jnp.clip(src_starts[source] + rows[:, 0] - dst_starts[source], 0, operand.shape[0] - 1)
    received = operands[source, source_row]
    mask = jnp.any(hits, axis=1).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(mask, received, output)


def ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array, send_sizes: jax.Array,
                      output_offsets: jax.Array, recv_sizes: jax.Array, *, axis_name: str) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` on GPU/TPU; the all-gather reference on CPU.

    The result varies over ``axis_name`` (each device receives different rows). jax's collective types it like
    its ``output`` buffer, often a fresh ``zeros`` that varies over nothing, which would make autodiff sum the
    gradients of different devices' rows; both buffers are therefore cast to vary over ``axis_name`` first, as
    the reference's result does.
    """
    if jax.default_backend() == "cpu":
        return ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                           axis_name=axis_name)
    axes = tuple(sorted(set(union_axes(operand, output)) | {axis_name}, key=str))
    return jax.lax.ragged_all_to_all(to_varying(operand, axes), to_varying(output, axes), input_offsets,
                                     send_sizes, output_offsets, recv_sizes, axis_name=axis_name)


__all__ = ["ragged_all_to_all", "ragged_all_to_all_reference"]
