"""RMSNorm of a scaled residual sum: the jnp form against the model's rms_norm, the kernels against the jnp form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from minimax_jax.model.norms_rope import rms_norm
from pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference, kernel_fits

_INTERPRET = jax.default_backend() != "gpu"
SCALES = jnp.array([3.5565588200778455, 1.0])  # the released model's alpha and beta


def _problem(dtype, shape=(2, 24, 256), seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x, y, g1, g2 = (jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys[:4])
    weight = 1.0 + 0.1 * jax.random.normal(keys[4], shape[-1:], jnp.float32)
    return x, y, weight, g1, g2


def _value_and_grads(norm, x, y, weight, g1, g2):
    """The outputs and the gradients of x, y, weight for cotangent g1 on the first copy and g2 on the second."""
    (out, out_again), vjp = jax.vjp(norm, x, y, weight)
    return out, out_again, vjp((g1, g2))


def test_reference_is_the_models_rms_norm_of_the_sum():
    x, y, weight, _, _ = _problem(jnp.bfloat16)
    summed = 3.5565588200778455 * x + 1.0 * y  # the decoder layer's bf16 ops, python-float scales
    want = rms_norm(summed, weight, 1e-5)
    got = add_rms_norm_reference(x, y, weight, SCALES, 1e-5)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_match_autodiff_of_the_jnp_form(dtype):
    x, y, weight, g1, g2 = _problem(dtype)
    kernel = _value_and_grads(lambda *a: add_rms_norm(*a, SCALES, 1e-5, use_kernel=True, interpret=_INTERPRET),
                              x, y, weight, g1, g2)
    # fp32 truth for both dtypes: the kernels keep fp32 intermediates where bf16 autodiff rounds them
    up = [a.astype(jnp.float32) for a in (x, y, weight, g1, g2)]
    truth = _value_and_grads(lambda *a: add_rms_norm(*a, SCALES, 1e-5, use_kernel=False), *up)
    out, out_again, grads = kernel
    assert out.dtype == dtype and out_again.dtype == dtype
    assert [g.dtype for g in grads] == [dtype, dtype, jnp.float32]
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out_again, np.float32))
    if dtype == jnp.bfloat16:  # the forward rounds exactly like the jnp form
        want = add_rms_norm_reference(x, y, weight, SCALES, 1e-5)
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for got, want in zip((out, *grads), (truth[0], *truth[2]), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_backward_adds_the_two_cotangents():
    """The second copy's gradient is not dropped: the weight and input gradients are those of g1 + g2."""
    x, y, weight, g1, g2 = _problem(jnp.float32)
    norm = lambda *a: add_rms_norm(*a, SCALES, 1e-5, use_kernel=True, interpret=_INTERPRET)  # noqa: E731
    _, _, split = _value_and_grads(norm, x, y, weight, g1, g2)
    _, _, summed = _value_and_grads(norm, x, y, weight, g1 + g2, jnp.zeros_like(g2))
    for a, b in zip(split, summed, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_traced_scales_zero_second_input():
    """The model's first layer normalizes the embedding alone: scales (1, 0) with a zero ``y``."""
    x, _, weight, _, _ = _problem(jnp.bfloat16)
    norm = jax.jit(lambda x, s: add_rms_norm(x, jnp.zeros_like(x), weight, s, 1e-5, use_kernel=True,
                                             interpret=_INTERPRET)[0])
    got = norm(x, jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(rms_norm(x, weight, 1e-5), np.float32))


def test_bad_inputs_are_named():
    x, y, weight, _, _ = _problem(jnp.float32)
    with pytest.raises(ValueError, match=r"x \(2, 24, 256\) float32 and y \(2, 24, 128\)"):
        add_rms_norm(x, y[..., :128], weight, SCALES, 1e-5)
    with pytest.raises(ValueError, match=r"weight \(128,\) must be \[hidden\]"):
        add_rms_norm(x, y, weight[:128], SCALES, 1e-5)
    with pytest.raises(ValueError, match=r"scales must have shape \(2,\)"):
        add_rms_norm(x, y, weight, SCALES[:1], 1e-5)
    odd = jnp.zeros((3, 96))
    assert not kernel_fits(odd) and not kernel_fits(jnp.zeros((3, 256))) and kernel_fits(jnp.zeros((4, 256)))
    with pytest.raises(ValueError, match=r"power-of-two hidden size .* got x \(3, 96\)"):
        add_rms_norm(odd, odd, jnp.ones(96), SCALES, 1e-5, use_kernel=True)
    # without the kernels any shape works
    out, _ = add_rms_norm(odd, odd, jnp.ones(96), SCALES, 1e-5, use_kernel=False)
    assert out.shape == (3, 96)


def test_kernels_lower_for_cuda():
    """Triton lowering of the forward and backward kernels for an H100, from CPU."""
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                       platform="gpu"))
    act = jax.ShapeDtypeStruct((2, 1024, 1024), jnp.bfloat16)

    def fwd_bwd(x, y, weight, scales):
        (out, out_again), vjp = jax.vjp(lambda *a: add_rms_norm(*a, scales, 1e-5, use_kernel=True), x, y, weight)
        return out, vjp((out, out_again))

    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(fwd_bwd), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
        )(act, act, jax.ShapeDtypeStruct((1024,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32))
    text = exported.mlir_module()
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2
    assert "add_rms_norm_backward" in text
