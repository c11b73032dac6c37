"""What the layers must say about shardings under a mesh with Explicit axis types (and nothing otherwise).

With Explicit axes the sharding is part of an array's type, and a few operations cannot infer their output's:
a row-parallel projection contracts over heads split on the tensor axis (its output needs a psum and a stated
sharding), and a gather of embedding rows by sharded token ids. Under Auto axes or no mesh these return None
and the compiler decides, as before.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def explicit_spec(x: jax.Array) -> tuple | None:
    """``x``'s PartitionSpec entries (padded to its rank) if it lives on a mesh with Explicit axes, else None."""
    sharding = jax.typeof(x).sharding
    if not isinstance(sharding, NamedSharding) or AxisType.Explicit not in sharding.mesh.axis_types:
        return None
    return tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))


def row_parallel_out_sharding(x: jax.Array) -> PartitionSpec | None:
    """Output sharding of ``[batch, seq, heads, head_dim] x [heads, head_dim, hidden] -> [batch, seq, hidden]``:
    batch and sequence as in ``x``, hidden replicated (the head contraction is summed over the tensor axis)."""
    spec = explicit_spec(x)
    return None if spec is None else PartitionSpec(spec[0], spec[1], None)
