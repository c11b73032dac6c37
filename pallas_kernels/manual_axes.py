"""Pallas calls inside ``jax.shard_map`` with ``check_vma``: every value is typed with the manual mesh axes it
varies over, and a ``pallas_call`` must declare its outputs' (``ShapeDtypeStruct(manual_axis_type=...)``).

The kernels run on operands cast to the union of their axes (a weight sharded over experts next to tokens sharded
over data and experts, say); the gradient of an operand that varies over fewer axes is summed over the others
(the transpose of that cast), so every cotangent has its primal's type, as ``custom_vjp`` requires. Outside
``shard_map`` every helper is the identity.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x: jax.Array) -> frozenset:
    """Manual mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def union_axes(*xs: jax.Array) -> tuple:
    """The manual axes any of ``xs`` varies over, in a fixed order."""
    return tuple(sorted(frozenset().union(*(varying_axes(x) for x in xs)), key=str))


def to_varying(x: jax.Array, axes: tuple) -> jax.Array:
    """``x`` cast to vary over ``axes`` too (no data movement)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x


def to_union(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """All of ``xs`` cast to the union of their axes."""
    axes = union_axes(*xs)
    return tuple(to_varying(x, axes) for x in xs)


def like_primal(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """``grad`` summed over the axes its primal does not vary over: the cotangent type ``custom_vjp`` wants."""
    extra = tuple(a for a in union_axes(grad) if a not in varying_axes(primal))
    return lax.psum(grad, extra) if extra else grad


def out_struct(shape: tuple[int, ...], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` output struct varying over the same manual axes as ``like``."""
    mat = getattr(jax.typeof(like), "manual_axis_type", None)
    if mat is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
