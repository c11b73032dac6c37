"""The Triton kernels lower for CUDA from a CPU-only machine (jax.export), forward and backward, in shard_map."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.lightning import lightning_attention

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
N_DEVICES = 4  # an abstract mesh: no real GPU (or several CPU devices) needed


def _export(fn, *args):
    mesh = AbstractMesh((N_DEVICES,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)
    n_in = len(args)
    out_specs = jax.tree.map(lambda _: P("data"), jax.eval_shape(fn, *args))
    in_specs = (P("data"),) * (n_in - 1) + (P(),)  # the last argument (decay) is replicated
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(sharded), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
        )(*args)
    assert exported.platforms == ("cuda",)
    text = exported.mlir_module()
    assert "manual_computation" in text  # the shard_map body
    b, t, h, d = args[0].shape
    per_shard = f"tensor<{b // N_DEVICES}x{t}x{h}x{d}x"
    assert per_shard in text, "kernels should see the per-device batch"
    return text


def _args(b, t, h, d, dtype):
    x = jax.ShapeDtypeStruct((b, t, h, d), dtype)
    return x, x, x, jax.ShapeDtypeStruct((h,), jnp.float32)


@pytest.mark.parametrize("d", [64, 128])
def test_forward_lowers_for_cuda(d):
    def fwd(q, k, v, decay):
        return lightning_attention(q, k, v, decay, backend="triton")

    text = _export(fwd, *_args(2 * N_DEVICES, 1000, 4, d, jnp.bfloat16))  # 1000: a tail for the xla path
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2  # chunk states + chunk outputs
    assert "num_warps" in text


def test_backward_lowers_for_cuda():
    def grads(q, k, v, decay):
        def loss(q_, k_, v_):
            o, s = lightning_attention(q_, k_, v_, decay, backend="triton", return_final_state=True)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = _export(grads, *_args(N_DEVICES, 2048, 4, 128, jnp.bfloat16))
    # forward: states + outputs; backward: states (recomputed), reverse states, dq, dk, dv
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 7
