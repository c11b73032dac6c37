"""Softmax cross-entropy loss and logit gradient: the jnp form against autodiff, the kernel against the jnp form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from minimax_jax.train.loss import cross_entropy_sum
from pallas_kernels import cross_entropy
from pallas_kernels.cross_entropy import kernel_fits, softmax_cross_entropy_grad, softmax_cross_entropy_grad_kernel


def _problem(dtype, rows=16, vocab=1024, scale=6.0, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    logits = (scale * jax.random.normal(keys[0], (rows, vocab), jnp.float32)).astype(dtype)
    targets = jax.random.randint(keys[1], (rows,), 0, vocab)
    mask = (jax.random.uniform(keys[2], (rows,)) > 0.3).astype(jnp.float32)
    return logits, targets, mask


def test_jnp_form_equals_autodiff_of_the_loss():
    logits, targets, mask = _problem(jnp.float32, vocab=200)
    row_loss, d_logits = softmax_cross_entropy_grad(logits, targets, mask)
    loss, grad = jax.value_and_grad(cross_entropy_sum)(logits, targets, mask)
    np.testing.assert_allclose(jnp.sum(row_loss), loss, rtol=1e-6)
    np.testing.assert_allclose(d_logits, grad, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(row_loss)[np.asarray(mask) == 0] == 0)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("max_tile", [256, 4096])  # several vocabulary tiles (online max), and one
def test_kernel_equals_the_jnp_form(monkeypatch, dtype, tol, max_tile):
    monkeypatch.setitem(cross_entropy.LAUNCH, "max_tile", max_tile)
    softmax_cross_entropy_grad_kernel.clear_cache()  # the launch knobs are read at trace time
    logits, targets, mask = _problem(dtype)
    got = softmax_cross_entropy_grad_kernel(logits, targets, mask, interpret=jax.default_backend() != "gpu")
    want = softmax_cross_entropy_grad(logits, targets, mask)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_kernel_takes_power_of_two_vocabulary_tiles_only():
    assert kernel_fits(jnp.zeros((8, 384))) and kernel_fits(jnp.zeros((7, 384)))  # tile 128, any row count
    assert not kernel_fits(jnp.zeros((8, 200)))  # largest power-of-two divisor 8
    assert not kernel_fits(jnp.zeros((2, 8, 384)))
    with pytest.raises(ValueError, match=r"logits \(8, 200\) need 2 axes and a vocabulary"):
        softmax_cross_entropy_grad_kernel(jnp.zeros((8, 200)), jnp.zeros((8,), jnp.int32), jnp.ones((8,)),
                                          interpret=True)


def test_kernel_lowers_for_cuda():
    """Triton lowering for an H100 from CPU (the logits' buffer becomes the gradient's)."""
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                       platform="gpu"))
    args = (jax.ShapeDtypeStruct((64, 65536), jnp.bfloat16), jax.ShapeDtypeStruct((64,), jnp.int32),
            jax.ShapeDtypeStruct((64,), jnp.float32))
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            softmax_cross_entropy_grad_kernel, platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
        )(*args)
    text = exported.mlir_module()
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 1 and "softmax_cross_entropy_grad" in text
    assert "tf.aliasing_output = 1" in text or "output_operand_aliases" in text
