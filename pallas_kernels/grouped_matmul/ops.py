"""Public entry point of the grouped matmul: validation, backend dispatch, custom_vjp of the Pallas backend.

``grouped_matmul(x, w, tile_group, tile=...)`` computes, for rows cut into tiles of ``tile`` rows::

    out[i*tile:(i+1)*tile] = x[i*tile:(i+1)*tile] @ w[tile_group[i]]      (zeros where tile_group[i] == G)

with ``x [R, K]``, ``w [G, K, N]`` (or S stacked matrices ``[G, S, K, N]`` whose products sit side by side:
``w[g]`` reads as ``[w[g, 0] | ... | w[g, S-1]]``, ``[K, S*N]``), ``R`` a multiple of ``tile`` and ``tile_group``
int32 ``[R // tile]`` NON-DECREASING, the value ``G`` marking unused tiles (which therefore come last). This is
the MoE expert matmul on a tile-aligned layout: each expert's rows padded to whole tiles (the caller builds the
layout once per layer, see ``minimax_jax/model/moe_dispatch.py``), so no tile straddles two experts and no kernel
needs a row mask.
Gradients flow to ``x`` and ``w``; ``tile_group`` is a constant.

Backends: ``reference`` (per-tile einsum with gathered weights, the oracle), ``xla`` (``jax.lax.ragged_dot`` on
the padded group sizes: the fast path on CPU and TPU), ``triton`` (Pallas-Triton kernels, ``triton_kernels.py``,
behind one custom_vjp: ``dx = gmm(dy, w^T)``, ``dw = tgmm(x, dy)``). ``mosaic_gpu`` (Hopper: warp-specialized
Mosaic-GPU kernels, ``mosaic_gpu.py``, same custom_vjp structure). ``auto``: mosaic_gpu on Hopper, triton on other
GPUs, each falling back (mosaic_gpu -> triton -> xla) for shapes it does not take, and Triton inside
``jax.shard_map`` (see ``pallas_kernels/manual_axes.py``); xla on CPU/TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.checkpoint_names import KERNEL_OUTPUT
from pallas_kernels.grouped_matmul import swiglu
from pallas_kernels.grouped_matmul import triton_kernels as tk
from pallas_kernels.manual_axes import like_primal, to_union, union_axes

BACKENDS = ("auto", "reference", "xla", "triton", "mosaic_gpu")
# Triton launch shapes (scripts/bench_moe.py --tune sweeps them): row tile (= the layout's tile), output column
# tile and depth step of the forward/input-gradient kernel; depth and column tiles of the weight-gradient kernel.
TUNING = {
    "tile": 128,
    "gmm": {"tn": 64, "bk": 32, "num_warps": 4, "num_stages": 3},  # H100 sweep, small preset (benchmarks.md)
    "tgmm": {"bk": 64, "bn": 256, "num_warps": 4, "num_stages": 2},
}
_FP32_MAX_STAGES = 2  # fp32 operands take twice the shared memory
_CPU_TILE = 8  # small tiles keep the padding (and so the wasted FLOPs) of the xla/reference layouts small


def _is_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``mosaic_gpu`` on Hopper GPUs, ``triton`` on other GPUs, ``xla`` elsewhere; other names are
    checked and returned."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_matmul: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if jax.default_backend() != "gpu":
            return "xla"
        return "mosaic_gpu" if _is_hopper() else "triton"
    return backend


def tile_rows(backend: str = "auto") -> int:
    """Row tile a backend wants the layout padded to (a multiple of 8)."""
    name = resolve_backend(backend)
    if name == "mosaic_gpu":
        from pallas_kernels.grouped_matmul import mosaic_gpu

        return mosaic_gpu.layout_tile()
    return TUNING["tile"] if name == "triton" else _CPU_TILE


def _validate(x, w, tile_group, tile) -> None:
    if x.ndim != 2 or w.ndim not in (3, 4):
        raise ValueError(f"grouped_matmul: x must be [rows, k] and w [groups, k, n] or [groups, stacks, k, n], got "
                         f"{x.shape} and {w.shape}")
    if x.shape[1] != w.shape[-2]:
        raise ValueError(f"grouped_matmul: x has depth {x.shape[1]} but w {w.shape} has depth {w.shape[-2]}")
    if x.shape[0] % tile:
        raise ValueError(f"grouped_matmul: rows {x.shape[0]} are not a multiple of the tile {tile}")
    if tile_group.shape != (x.shape[0] // tile,):
        raise ValueError(f"grouped_matmul: tile_group must have shape ({x.shape[0] // tile},) for {x.shape[0]} rows "
                         f"and tile {tile}, got {tile_group.shape}")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_matmul: x and w must share a dtype, got {x.dtype} and {w.dtype}")


def _side_by_side(w):
    """Stacked weights ``[G, S, K, N]`` as the ``[G, K, S*N]`` matrices they stand for (a copy); 3-D ``w`` as is."""
    if w.ndim == 3:
        return w
    groups, stacks, depth, width = w.shape
    return jnp.moveaxis(w, 1, 2).reshape(groups, depth, stacks * width)


def _reference(x, w, tile_group, tile):
    num_groups = w.shape[0]
    tiles = x.reshape(-1, tile, x.shape[1])
    weights = w[jnp.minimum(tile_group, num_groups - 1)]
    out = jnp.einsum("tmk,tkn->tmn", tiles, weights, preferred_element_type=jnp.float32)
    out = jnp.where((tile_group < num_groups)[:, None, None], out, 0.0)
    return out.reshape(x.shape[0], -1).astype(x.dtype)


def _xla(x, w, tile_group, tile):
    group_sizes = _padded_group_sizes(tile_group, w.shape[0], tile)
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)


def _power_of_two_tile(dim: int, want: int, what: str) -> int:
    """Largest power of two <= ``want`` dividing ``dim`` (>= 16, Triton's smallest matmul tile)."""
    size = want
    while size >= 16 and dim % size:
        size //= 2
    if size < 16:
        raise ValueError(f"grouped_matmul[triton]: {what} = {dim} must be a multiple of 16")
    return size


def _triton_fits(x, w) -> bool:
    return x.shape[1] % 16 == 0 and w.shape[2] % 16 == 0


def _launch(name, dtype, **dims):
    knobs = dict(TUNING[name])
    if jnp.dtype(dtype).itemsize >= 4:
        knobs["num_stages"] = min(knobs["num_stages"], _FP32_MAX_STAGES)
    for knob, (dim, what) in dims.items():
        knobs[knob] = _power_of_two_tile(dim, knobs[knob], what)
    return knobs


def _padded_group_sizes(tile_group, num_groups, tile):
    """Rows per group of the tile-aligned layout (whole tiles), int32 ``[G]``."""
    return jnp.bincount(tile_group, length=num_groups).astype(jnp.int32) * tile


@jax.custom_vjp
def _mosaic_gpu(x, w, group_sizes):
    """``w [G, S, K, N]``: the kernels read stacked weights in place."""
    from pallas_kernels.grouped_matmul import mosaic_gpu  # imports Mosaic GPU: only when asked for

    return mosaic_gpu.gmm(x, w, group_sizes)


def _mosaic_gpu_fwd(x, w, group_sizes):
    return _mosaic_gpu(x, w, group_sizes), (x, w, group_sizes)


def _mosaic_gpu_bwd(res, dy):
    from pallas_kernels.grouped_matmul import mosaic_gpu

    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = mosaic_gpu.gmm(dy, w, group_sizes, transpose_w=True)
    dw = mosaic_gpu.tgmm(x, dy, group_sizes, stacks=w.shape[1]).astype(w.dtype)
    return dx, dw, None


_mosaic_gpu.defvjp(_mosaic_gpu_fwd, _mosaic_gpu_bwd)


@jax.custom_vjp
def _mosaic_gpu_swiglu(x, w13, group_sizes, row_weight):
    """``weighted_swiglu(x @ [W1 | W3], row_weight)`` with the SwiGLU in the forward kernel's epilogue; ``gate_up``
    is kept for the backward pass, which is ``_mosaic_gpu``'s with the SwiGLU gradient kernel in front."""
    return _mosaic_gpu_swiglu_fwd(x, w13, group_sizes, row_weight)[0]


def _mosaic_gpu_swiglu_fwd(x, w13, group_sizes, row_weight):
    from pallas_kernels.grouped_matmul import mosaic_gpu

    gate_up, hidden = mosaic_gpu.gmm_swiglu(x, w13, group_sizes, row_weight)
    # remat policies may keep it (a kernel output, not an XLA dot)
    return hidden, (x, w13, checkpoint_name(gate_up, KERNEL_OUTPUT), group_sizes, row_weight)


def _mosaic_gpu_swiglu_bwd(res, d_hidden):
    x, w13, gate_up, group_sizes, row_weight = res
    grad = swiglu.weighted_swiglu_grad_kernel if swiglu.kernel_fits(gate_up) else swiglu.weighted_swiglu_grad
    d_gate_up, d_row_weight = grad(gate_up, row_weight, d_hidden.astype(gate_up.dtype))
    return *_mosaic_gpu_bwd((x, w13, group_sizes), d_gate_up), d_row_weight.astype(row_weight.dtype)


_mosaic_gpu_swiglu.defvjp(_mosaic_gpu_swiglu_fwd, _mosaic_gpu_swiglu_bwd)


def _triton_gmm(x, w, tile_group, tile, interpret, transpose_w=False):
    x, w, tile_group = to_union(x, w, tile_group)  # inside shard_map: one set of manual axes (manual_axes.py)
    k, n = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    knobs = _launch("gmm", x.dtype, tn=(n, "output width"), bk=(k, "depth"))
    return tk.gmm(x, w, tile_group, num_groups=w.shape[0], tm=tile, transpose_w=transpose_w, interpret=interpret,
                  **knobs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _triton(x, w, tile_group, tile, interpret):
    return _triton_gmm(x, w, tile_group, tile, interpret)


def _triton_fwd(x, w, tile_group, tile, interpret):
    return _triton_gmm(x, w, tile_group, tile, interpret), (x, w, tile_group)


def _triton_bwd(tile, interpret, res, dy):
    x_primal, w_primal, tile_group = res
    x, w, dy = to_union(x_primal, w_primal, dy.astype(x_primal.dtype))
    num_groups = w.shape[0]
    dx = _triton_gmm(dy, w, tile_group, tile, interpret, transpose_w=True)
    # first tile of each group, then the number of used tiles: tile_group is sorted
    group_ids = jnp.arange(num_groups + 1, dtype=tile_group.dtype)
    group_tiles = jnp.searchsorted(tile_group, group_ids, method="compare_all").astype(jnp.int32)
    knobs = _launch("tgmm", x.dtype, bk=(x.shape[1], "depth"), bn=(dy.shape[1], "output width"))
    dw = tk.tgmm(x, dy, group_tiles, num_groups=num_groups, tm=tile, out_dtype=w.dtype, interpret=interpret,
                 **knobs)
    return like_primal(dx, x_primal), like_primal(dw, w_primal), None


_triton.defvjp(_triton_fwd, _triton_bwd)


def _backend_for(x, w, backend):
    """The backend that runs ``x @ w`` (``auto`` resolved, with its fallbacks for shapes and ``jax.shard_map``)."""
    name = resolve_backend(backend)
    if backend == "auto" and name == "mosaic_gpu":
        from pallas_kernels.grouped_matmul import mosaic_gpu

        # the Mosaic-GPU kernels cannot declare their outputs' manual axes (shard_map with check_vma): Triton there
        if not mosaic_gpu.fits(x.shape[1], w.shape[-1], x.dtype) or union_axes(x, w):
            name = "triton"
    if name == "mosaic_gpu" and union_axes(x, w):
        raise ValueError("grouped_matmul[mosaic_gpu] cannot run inside jax.shard_map with check_vma: its kernels "
                         "do not declare their outputs' manual axes; use backend='triton' or 'auto'")
    return name


def grouped_swiglu(x: jax.Array, w13: jax.Array, tile_group: jax.Array, row_weight: jax.Array, *, tile: int,
                   backend: str = "auto", interpret: bool | None = None) -> jax.Array:
    """``weighted_swiglu(grouped_matmul(x, w13, ...), row_weight)``: the MoE experts' ``w * silu(x W1) * (x W3)``,
    ``[R, N]`` for stacked ``w13 [G, 2, K, N]`` and one weight per row (``[R]``, the routing weights). On Hopper the
    SwiGLU runs in the matmul kernel's epilogue (no pass over ``[R, 2N]``)."""
    if w13.ndim != 4 or w13.shape[1] != 2:
        raise ValueError(f"grouped_swiglu: w13 must stack W1 and W3 as [groups, 2, k, n], got {w13.shape}")
    _validate(x, w13, tile_group, tile)
    if row_weight.shape != (x.shape[0],):
        raise ValueError(f"grouped_swiglu: row_weight must have shape ({x.shape[0]},), one per row of x, got "
                         f"{row_weight.shape}")
    if _backend_for(x, w13, backend) == "mosaic_gpu":
        sizes = _padded_group_sizes(tile_group.astype(jnp.int32), w13.shape[0], tile)
        return _mosaic_gpu_swiglu(x, w13, sizes, row_weight)
    gate_up = grouped_matmul(x, w13, tile_group, tile=tile, backend=backend, interpret=interpret)
    return swiglu.weighted_swiglu(checkpoint_name(gate_up, KERNEL_OUTPUT), row_weight)


def grouped_matmul(x: jax.Array, w: jax.Array, tile_group: jax.Array, *, tile: int, backend: str = "auto",
                   interpret: bool | None = None) -> jax.Array:
    """Row tile ``i`` of ``x`` times ``w[tile_group[i]]`` (module docstring); ``[R, N]`` in the dtype of ``x``.

    Args:
      x: ``[R, K]`` rows, ``R`` a multiple of ``tile``; w: ``[G, K, N]`` or stacked ``[G, S, K, N]`` (same dtype
        as x; the result is ``[R, S*N]``).
      tile_group: int32 ``[R // tile]``, non-decreasing, ``G`` for unused tiles.
      tile: rows per tile (``tile_rows(backend)`` is what the backend wants).
      backend: one of ``BACKENDS``.
      interpret: run the triton backend in Pallas interpret mode; None: interpret unless the default device is a
        GPU (so the triton path is testable on CPU; pass False to lower it for CUDA from a CPU host).
    """
    _validate(x, w, tile_group, tile)
    tile_group = tile_group.astype(jnp.int32)
    name = _backend_for(x, w, backend)
    if name == "mosaic_gpu":
        stacked = w if w.ndim == 4 else w[:, None]
        return _mosaic_gpu(x, stacked, _padded_group_sizes(tile_group, w.shape[0], tile))
    w = _side_by_side(w)
    if backend == "auto" and name == "triton" and not _triton_fits(x, w):
        name = "xla"  # widths that are not multiples of 16 (test-sized models) take ragged_dot
    if name == "reference":
        return _reference(x, w, tile_group, tile)
    if name == "xla":
        return _xla(x, w, tile_group, tile)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _triton(x, w, tile_group, tile, interpret)
