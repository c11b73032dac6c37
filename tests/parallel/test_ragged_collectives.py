"""The all-gather reference of ragged_all_to_all against the semantics documented for jax.lax.ragged_all_to_all."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from minimax_jax.parallel.ragged_collectives import ragged_all_to_all_reference
from tests.parallel.conftest import mesh_of


def test_reference_moves_each_slice_where_the_documented_semantics_put_it():
    n, rows, width = 4, 6, 3
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, rows, width)).astype(np.float32)
    sizes = rng.integers(0, 3, (n, n))  # sizes[src, dst], each row sums to <= rows
    sizes[1] = 0  # device 1 sends nothing; device 2 then receives an empty slice from it
    in_off = np.cumsum(sizes, 1) - sizes
    out_off = np.cumsum(sizes, 0) - sizes  # receivers stack slices by source
    capacity = n * rows
    want = np.full((n, capacity, width), -1.0, np.float32)
    for src in range(n):
        for dst in range(n):
            want[dst, out_off[src, dst]:out_off[src, dst] + sizes[src, dst]] = \
                data[src, in_off[src, dst]:in_off[src, dst] + sizes[src, dst]]

    def local(x, i_off, s, o_off, r):
        out = jnp.full((capacity, width), -1.0, jnp.float32)
        return ragged_all_to_all_reference(x[0], out, i_off[0], s[0], o_off[0], r[0], axis_name="expert")[None]

    mesh = mesh_of({"expert": n})
    recv = sizes.T  # recv[dst, src]
    args = [jnp.asarray(a) for a in (data, in_off, sizes, out_off, recv)]
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, P("expert")) for a in args]
        got = jax.jit(jax.shard_map(local, in_specs=P("expert"), out_specs=P("expert")))(*args)
    np.testing.assert_array_equal(np.asarray(got), want)
