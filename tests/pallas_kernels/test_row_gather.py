"""Row gather kernel: equals ``jnp.take(..., mode="fill")`` (interpret mode here) and lowers for CUDA as one kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractMesh, AxisType

from pallas_kernels.row_gather import LAUNCH, fits, gather_rows
from tests.pallas_kernels.test_export import H100


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gather_rows_equals_take_with_zero_fill(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((10, 32)), dtype)
    index = jnp.asarray(rng.integers(0, 13, 3 * LAUNCH["rows"]), jnp.int32)  # 10..12: out of range -> zeros
    assert fits(x, index)
    got = gather_rows(x, index, interpret=True)
    np.testing.assert_array_equal(got, jnp.take(x, index, axis=0, mode="fill", fill_value=0))


def test_fits_wants_power_of_two_widths_and_whole_programs():
    x = jnp.zeros((4, 32))
    assert not fits(jnp.zeros((4, 24)), jnp.zeros(LAUNCH["rows"], jnp.int32))
    assert not fits(x, jnp.zeros(LAUNCH["rows"] + 1, jnp.int32))
    assert not fits(jnp.zeros((4, 2, 16)), jnp.zeros(LAUNCH["rows"], jnp.int32))


def test_gather_rows_lowers_for_cuda_as_one_kernel():
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)
    disabled = [jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)]
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.export.export(jax.jit(gather_rows), platforms=["cuda"], disabled_checks=disabled)(
            jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((8192,), jnp.int32)).mlir_module()
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 1
