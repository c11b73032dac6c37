"""The Pallas grouped matmul inside ``jax.shard_map`` (check_vma): outputs declare their manual axes, and the
gradient of a weight replicated over the mesh is summed over it, as jax's own ``ragged_dot`` gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.grouped_matmul import grouped_matmul
from tests.parallel.conftest import mesh_of

TILE, GROUPS, DEPTH, WIDTH = 8, 3, 16, 32


def _inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    # per device: 4 row tiles, groups [0, 0, 2, unused] and [1, 2, 2, 2] (group 1 empty on the first)
    tile_group = jnp.asarray([0, 0, 2, GROUPS, 1, 2, 2, 2], jnp.int32)
    x = jax.random.normal(keys[0], (tile_group.shape[0] * TILE, DEPTH), jnp.float32)
    w = jax.random.normal(keys[1], (GROUPS, DEPTH, WIDTH), jnp.float32)
    cotangent = jax.random.normal(keys[2], (x.shape[0], WIDTH), jnp.float32)
    return x, w, tile_group, cotangent


@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
def test_grouped_matmul_in_shard_map_matches_ragged_dot(backend):
    x, w, tile_group, cotangent = _inputs()
    mesh = mesh_of({"data": 2}, AxisType.Auto)

    def run(name):
        def local(x, w, tile_group):
            return grouped_matmul(x, w, tile_group, tile=TILE, backend=name)

        sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P("data"))

        def loss(x, w):
            return jnp.sum(sharded(x, w, tile_group) * cotangent)

        return jax.jit(sharded)(x, w, tile_group), jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    with jax.set_mesh(mesh):
        if backend == "mosaic_gpu":  # the Mosaic-GPU kernels cannot declare their outputs' axes: a clear error
            with pytest.raises(ValueError, match="cannot run inside jax.shard_map"):
                run("mosaic_gpu")
            return
        if jax.default_backend() != "gpu":
            pytest.skip("Pallas interpret mode cannot run under shard_map's check_vma (jax 0.11.2): needs 2 GPUs")
        out, (dx, dw) = run("triton")
        want_out, (want_dx, want_dw) = run("xla")
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)  # summed over both devices
    assert np.abs(np.asarray(want_dw)).max() > 0
