"""Lightning's gated output norm: the jnp form against the model's ops, the kernels against the jnp form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from minimax_jax.model.norms_rope import rms_norm
from pallas_kernels.gated_rms_norm import gated_rms_norm, gated_rms_norm_reference

_INTERPRET = jax.default_backend() != "gpu"
EPS = 1e-6


def _problem(dtype, shape=(2, 24, 4, 64), seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    o, gate, dy = (jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys[:3])
    weight = 1.0 + 0.1 * jax.random.normal(keys[3], shape[-2:], jnp.float32)
    return o, gate, weight, dy


def _value_and_grads(norm, o, gate, weight, dy):
    out, vjp = jax.vjp(norm, o, gate, weight)
    return out, vjp(dy)


def test_reference_is_the_models_gate_times_rms_norm():
    o, gate, weight, _ = _problem(jnp.bfloat16)
    want = jax.nn.sigmoid(gate) * rms_norm(o, weight, EPS)  # lightning_output's bf16 ops
    got = gated_rms_norm_reference(o, gate, weight, EPS)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_match_autodiff_of_the_jnp_form(dtype):
    o, gate, weight, dy = _problem(dtype)
    out, grads = _value_and_grads(lambda *a: gated_rms_norm(*a, EPS, use_kernel=True, interpret=_INTERPRET),
                                  o, gate, weight, dy)
    # fp32 truth for both dtypes: the kernels keep fp32 intermediates where bf16 autodiff rounds them
    up = [a.astype(jnp.float32) for a in (o, gate, weight, dy)]
    truth_out, truth_grads = _value_and_grads(lambda *a: gated_rms_norm(*a, EPS, use_kernel=False), *up)
    assert out.dtype == dtype and out.shape == o.shape
    assert [g.dtype for g in grads] == [dtype, dtype, jnp.float32] and grads[2].shape == weight.shape
    if dtype == jnp.bfloat16:  # within two bf16 ulps of the jnp form: its bf16 sigmoid may round differently
        want = np.asarray(gated_rms_norm_reference(o, gate, weight, EPS), np.float32)
        np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2 ** -6, atol=0)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for got, want in zip((out, *grads), (truth_out, *truth_grads), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_bad_inputs_are_named():
    o, gate, weight, _ = _problem(jnp.float32)
    with pytest.raises(ValueError, match=r"o \(2, 24, 4, 64\) and gate \(2, 24, 4, 32\)"):
        gated_rms_norm(o, gate[..., :32], weight, EPS)
    with pytest.raises(ValueError, match=r"weight \(4, 32\) must match the trailing axes"):
        gated_rms_norm(o, gate, weight[:, :32], EPS)
    odd = jnp.zeros((3, 2, 48))
    with pytest.raises(ValueError, match=r"power-of-two feature count .* got o \(3, 2, 48\)"):
        gated_rms_norm(odd, odd, jnp.ones((2, 48)), EPS, use_kernel=True)
    assert gated_rms_norm(odd, odd, jnp.ones((2, 48)), EPS, use_kernel=False).shape == (3, 2, 48)


def test_kernels_lower_for_cuda():
    """Triton lowering of the forward and backward kernels for an H100, from CPU."""
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                       platform="gpu"))
    act = jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16)

    def fwd_bwd(o, gate, weight):
        out, vjp = jax.vjp(lambda *a: gated_rms_norm(*a, EPS, use_kernel=True), o, gate, weight)
        return out, vjp(out)

    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(fwd_bwd), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
        )(act, act, jax.ShapeDtypeStruct((8, 128), jnp.float32))
    text = exported.mlir_module()
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2
    assert "gated_rms_norm_backward" in text
