"""Grouped matmul: every backend equals the per-tile reference (values, dx, dw), on uneven loads with empty groups
and unused tiles; bad input is refused; the Triton kernels lower for CUDA from CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractMesh, AxisType

from pallas_kernels.checkpoint_names import KERNEL_OUTPUT
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_swiglu, mosaic_gpu, weighted_swiglu
from pallas_kernels.grouped_matmul.ops import _is_hopper
from tests.pallas_kernels.test_export import H100

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _problem(tile_group, tile, k, n, groups, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    rows = len(tile_group) * tile
    x = jax.random.normal(keys[0], (rows, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (groups, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    cotangent = jax.random.normal(keys[2], (rows, n), jnp.float32)
    return x, w, jnp.asarray(tile_group, jnp.int32), cotangent


def _value_and_grads(backend, x, w, tile_group, tile, cotangent):
    def loss(x_, w_):
        out = grouped_matmul(x_, w_, tile_group, tile=tile, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
    return out, dx, dw


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# 4 groups: group 1 empty, group 0 two tiles, group 3 one tile, then two unused tiles (value 4).
CASES = [([0, 0, 2, 3, 4, 4], 16, 32, 48), ([1, 1, 1, 1], 16, 64, 16), ([3, 4, 4, 4], 32, 16, 32)]


@pytest.mark.parametrize("backend", ["xla", "triton"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tile_group, tile, k, n", CASES)
def test_backend_equals_reference(backend, dtype, tile_group, tile, k, n):
    x, w, tg, cotangent = _problem(tile_group, tile, k, n, 4, dtype)
    got = _value_and_grads(backend, x, w, tg, tile, cotangent)
    want = _value_and_grads("reference", x.astype(jnp.float32), w.astype(jnp.float32), tg, tile, cotangent)
    for name, g, r in zip(("out", "dx", "dw"), got, want, strict=True):
        assert g.dtype == dtype, name
        assert _rel_err(g, r) < TOL[dtype], (name, _rel_err(g, r))
    unused = np.repeat(np.asarray(tile_group) == 4, tile)
    assert not np.any(np.asarray(got[0])[unused]), "unused tiles must be zeros"
    assert not np.any(np.asarray(got[1])[unused]), "unused tiles get no gradient"
    empty = sorted(set(range(4)) - set(tile_group))
    assert not np.any(np.asarray(got[2])[empty]), "a group without rows gets a zero weight gradient"


def _side_by_side(w):
    return jnp.concatenate(list(jnp.moveaxis(w, 1, 0)), axis=-1)  # [G, S, K, N] -> [G, K, S*N]


@pytest.mark.parametrize("backend", ["reference", "xla", "triton"])
def test_stacked_weights_equal_their_side_by_side_matrix(backend):
    """``w [G, S, K, N]`` computes ``x @ [w[g, 0] | w[g, 1]]``; its gradient is the stacked split of that matrix's."""
    tile_group, tile = [0, 0, 2, 3, 4], 16
    x, w_flat, tg, cotangent = _problem(tile_group, tile, 32, 2 * 16, 4, jnp.float32)
    w = jnp.stack([w_flat[:, :, :16], w_flat[:, :, 16:] * 2], axis=1)  # [G, 2, K, 16], the halves differ
    got = _value_and_grads(backend, x, w, tg, tile, cotangent)
    want = _value_and_grads("reference", x, _side_by_side(w), tg, tile, cotangent)
    assert got[2].shape == w.shape
    for name, g, r in zip(("out", "dx", "dw"), (*got[:2], _side_by_side(got[2])), want, strict=True):
        assert _rel_err(g, r) < TOL[jnp.float32], (name, _rel_err(g, r))


def test_reference_is_the_per_group_product():
    x, w, tg, _ = _problem([0, 2, 2, 4], 8, 16, 8, 4, jnp.float32, seed=3)
    out = np.asarray(grouped_matmul(x, w, tg, tile=8, backend="reference"))
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(out[:8], x[:8] @ w[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[8:24], x[8:24] @ w[2], rtol=1e-5, atol=1e-5)
    assert not np.any(out[24:])


@pytest.mark.parametrize("backend", ["reference", "xla", "triton"])
def test_bad_input_is_refused_with_the_problem_named(backend):
    x, w, tg, _ = _problem([0, 1], 16, 32, 32, 2, jnp.float32)
    with pytest.raises(ValueError, match="not a multiple of the tile"):
        grouped_matmul(x[:-1], w, tg, tile=16, backend=backend)
    with pytest.raises(ValueError, match="tile_group must have shape"):
        grouped_matmul(x, w, tg[:1], tile=16, backend=backend)
    with pytest.raises(ValueError, match="depth"):
        grouped_matmul(x[:, :16], w, tg, tile=16, backend=backend)
    with pytest.raises(ValueError, match="share a dtype"):
        grouped_matmul(x.astype(jnp.bfloat16), w, tg, tile=16, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        grouped_matmul(x, w, tg, tile=16, backend="cuda")


def test_triton_refuses_widths_that_are_not_multiples_of_16():
    x, w, tg, _ = _problem([0, 1], 16, 32, 24, 2, jnp.float32)
    with pytest.raises(ValueError, match="output width = 24 must be a multiple of 16"):
        grouped_matmul(x, w, tg, tile=16, backend="triton")


def test_triton_lowers_for_cuda_forward_and_backward():
    """jax.export for CUDA from this CPU host: one kernel forward, gmm + transposed gmm + weight-gradient kernel."""
    x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((8, 256, 128), jnp.bfloat16)
    tg = jax.ShapeDtypeStruct((4,), jnp.int32)

    def forward(x_, w_, tg_):
        return grouped_matmul(x_, w_, tg_, tile=128, backend="triton", interpret=False)

    def grads(x_, w_, tg_):
        return jax.grad(lambda a, b: jnp.sum(forward(a, b, tg_).astype(jnp.float32) ** 2), argnums=(0, 1))(x_, w_)

    disabled = [jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)]
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)
    for fn, kernels in ((forward, 1), (grads, 3)):
        with jax.sharding.use_abstract_mesh(mesh):
            exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(x, w, tg)
        text = exported.mlir_module()
        assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == kernels, fn.__name__


def test_mosaic_gpu_kernels_lower_for_cuda_forward_and_backward():
    """jax.export for an H100 from this CPU host (Mosaic GPU kernels have no interpret mode to run here): one kernel
    forward; the transposed forward kernel and the weight-gradient kernel backward."""
    tile = mosaic_gpu.layout_tile()
    x = jax.ShapeDtypeStruct((4 * tile, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((8, 2, 256, 256), jnp.bfloat16)  # stacked: read in place, no copy kernel
    tg = jax.ShapeDtypeStruct((4,), jnp.int32)

    def forward(x_, w_, tg_):
        return grouped_matmul(x_, w_, tg_, tile=tile, backend="mosaic_gpu")

    def grads(x_, w_, tg_):
        return jax.grad(lambda a, b: jnp.sum(forward(a, b, tg_).astype(jnp.float32) ** 2), argnums=(0, 1))(x_, w_)

    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)
    for fn, kernels in ((forward, 1), (grads, 3)):
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.export.export(jax.jit(fn), platforms=["cuda"])(x, w, tg).mlir_module()
        assert text.count("mosaic_gpu_v2") == kernels, (fn.__name__, text.count("mosaic_gpu_v2"))


def test_mosaic_gpu_swiglu_lowers_as_one_kernel_and_is_kept_under_remat():
    """The fused W1|W3 + SwiGLU forward is one kernel; backward adds the input- and weight-gradient kernels. Under
    the ``dots_and_kernel_outputs`` remat policy its ``gate_up`` residual is kept, so the forward kernel is not run
    again in the backward pass."""
    tile = mosaic_gpu.layout_tile()
    x = jax.ShapeDtypeStruct((4 * tile, 256), jnp.bfloat16)
    w13 = jax.ShapeDtypeStruct((8, 2, 256, 256), jnp.bfloat16)
    tg = jax.ShapeDtypeStruct((4,), jnp.int32)
    row_weight = jax.ShapeDtypeStruct((4 * tile,), jnp.float32)

    def forward(x_, w_, rw_, tg_):
        return grouped_swiglu(x_, w_, tg_, rw_, tile=tile, backend="mosaic_gpu")

    def grads(x_, w_, rw_, tg_, layer=forward):
        return jax.grad(lambda a, b, c: jnp.sum(layer(a, b, c, tg_).astype(jnp.float32) ** 2),
                        argnums=(0, 1, 2))(x_, w_, rw_)

    policy = jax.checkpoint_policies.save_only_these_names(KERNEL_OUTPUT)
    remat_grads = functools.partial(grads, layer=jax.checkpoint(forward, policy=policy))
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)
    disabled = [jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)]
    # (Mosaic GPU kernels, Pallas-Triton kernels): the backward adds dx, dw and the SwiGLU gradient kernel
    for fn, kernels in ((forward, (1, 0)), (grads, (3, 1)), (remat_grads, (3, 1))):
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(
                x, w13, row_weight, tg).mlir_module()
        counts = (text.count("mosaic_gpu_v2"), text.count(pltriton.CUSTOM_CALL_TARGET_NAME))
        assert counts == kernels, (fn, counts)


def _row_weight(rows):
    """Routing-like row weights in (0, 1], zero on the last tile (padding rows)."""
    weight = jax.random.uniform(jax.random.key(7), (rows,), jnp.float32, 0.05, 1.0)
    return weight.at[-rows // 8:].set(0.0)


@pytest.mark.parametrize("backend", ["reference", "xla", "triton"])
def test_grouped_swiglu_is_weighted_swiglu_of_the_grouped_matmul(backend):
    tile_group, tile = [0, 0, 2, 3, 4], 16
    x, w_flat, tg, _ = _problem(tile_group, tile, 32, 2 * 16, 4, jnp.float32)
    w13 = jnp.stack([w_flat[:, :, :16], w_flat[:, :, 16:]], axis=1)
    row_weight = _row_weight(x.shape[0])
    ct = jax.random.normal(jax.random.key(5), (x.shape[0], 16), jnp.float32)

    def loss(fn):
        return lambda a, b, c: jnp.sum(fn(a, b, c) * ct)

    got = jax.value_and_grad(loss(lambda a, b, c: grouped_swiglu(a, b, tg, c, tile=tile, backend=backend)),
                             argnums=(0, 1, 2))(x, w13, row_weight)
    want = jax.value_and_grad(
        loss(lambda a, b, c: weighted_swiglu(grouped_matmul(a, b, tg, tile=tile, backend="reference"), c)),
        argnums=(0, 1, 2))(x, w13, row_weight)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _rel_err(g, r) < TOL[jnp.float32]
    with pytest.raises(ValueError, match=r"w13 must stack W1 and W3 as \[groups, 2, k, n\]"):
        grouped_swiglu(x, w_flat, tg, row_weight, tile=tile, backend=backend)
    with pytest.raises(ValueError, match=r"row_weight must have shape \(80,\), one per row of x"):
        grouped_swiglu(x, w13, tg, row_weight[:-1], tile=tile, backend=backend)


@pytest.mark.skipif(not _is_hopper(), reason="Mosaic GPU kernels need an sm_90 GPU (no interpret mode)")
def test_mosaic_gpu_swiglu_equals_reference_on_hopper():
    """The fused kernel: values and gradients (rows, weights, row weights) against the reference, zeros on unused
    tiles, an empty group."""
    tile = mosaic_gpu.layout_tile()
    tile_group = [0, 0, 0, 2, 3, 3, 4, 4]
    x, w_flat, tg, _ = _problem(tile_group, tile, 256, 2 * 256, 4, jnp.bfloat16)
    w13 = jnp.stack(jnp.split(w_flat, 2, axis=-1), axis=1)
    row_weight = _row_weight(x.shape[0])
    ct = jax.random.normal(jax.random.key(5), (x.shape[0], 256), jnp.float32)

    def value_and_grads(backend, x_, w_):
        def loss(a, b, c):
            out = grouped_swiglu(a, b, tg, c, tile=tile, backend=backend)
            return jnp.sum(out.astype(jnp.float32) * ct), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x_, w_, row_weight)
        return (out, *grads)

    got = value_and_grads("mosaic_gpu", x, w13)
    want = value_and_grads("reference", x.astype(jnp.float32), w13.astype(jnp.float32))
    for name, g, r in zip(("out", "dx", "dw", "d_row_weight"), got, want, strict=True):
        assert _rel_err(g, r) < TOL[jnp.bfloat16], (name, _rel_err(g, r))
    assert not np.any(np.asarray(got[0])[-2 * tile:]), "unused tiles must be zeros"
    assert not np.any(np.asarray(got[2])[1]), "a group without rows gets a zero weight gradient"


@pytest.mark.skipif(not _is_hopper(), reason="Mosaic GPU kernels need an sm_90 GPU (no interpret mode)")
@pytest.mark.parametrize("k, n, stacks", [(512, 256, 1), (256, 512, 1), (256, 256, 2)])
def test_mosaic_gpu_equals_reference_on_hopper(k, n, stacks):
    """The Hopper kernels on the layout: uneven groups, an empty group, unused trailing tiles (which the kernels
    write as zeros without a matmul); plain and stacked weights."""
    tile = mosaic_gpu.layout_tile()
    tile_group = [0, 0, 0, 2, 3, 3, 4, 4]
    x, w, tg, cotangent = _problem(tile_group, tile, k, n * stacks, 4, jnp.bfloat16)
    if stacks > 1:
        w = jnp.stack(jnp.split(w, stacks, axis=-1), axis=1)  # [G, S, k, n]; side by side it is the same matrix
    got = _value_and_grads("mosaic_gpu", x, w, tg, tile, cotangent)
    want = _value_and_grads("reference", x.astype(jnp.float32), w.astype(jnp.float32), tg, tile, cotangent)
    assert got[2].shape == w.shape
    for name, g, r in zip(("out", "dx", "dw"), got, want, strict=True):
        assert _rel_err(g, r) < TOL[jnp.bfloat16], (name, _rel_err(g, r))
    assert not np.any(np.asarray(got[0])[-2 * tile:]), "unused tiles must be zeros"
    assert not np.any(np.asarray(got[2])[1]), "a group without rows gets a zero weight gradient (the kernel writes it)"
