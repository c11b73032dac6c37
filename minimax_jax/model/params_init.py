"""Parameter constructors: initializers plus logical axis names as sharding metadata (no mesh needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, axes: tuple[str | None, ...],
                 std: float = INIT_STD) -> nnx.Param:
    """A ``Param`` drawn from N(0, std^2), tagged with logical axis names (``out_sharding``, not applied eagerly)."""
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def ones_param(shape: tuple[int, ...], dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    """A ``Param`` of ones (norm scales), tagged with logical axis names."""
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=axes, eager_sharding=False)
