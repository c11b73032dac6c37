"""Hopper backend of the grouped matmul (Pallas Mosaic GPU, sm_90 only; no interpret mode, so CPU tests cover the
Triton kernels instead).

* ``gmm`` (forward and input gradient) is this module's warp-specialized kernel: one producer warpgroup streams
  row and weight blocks through shared memory with TMA while two consumer warpgroups run wgmma, each on its own
  half of a ``tile_m`` x ``2 * tile_n`` CTA tile's columns (the layout tile is ``tile_m`` rows: one group per CTA
  tile). A persistent grid walks the (row tile, column tile) pairs; a row tile's group comes from the groups'
  cumulative tile counts, and unused trailing tiles are written as zeros without a matmul.
  jax's own ragged-dot kernels (one warpgroup, no producer warp) ran these shapes at 240-490 TFLOP/s on an H100;
  a warp-specialized dense matmul at 610-700 (docs/benchmarks.md).
* ``tgmm`` (weight gradient) has the same structure: per (group, output tile) the pipeline walks the group's rows
  (a dynamic number of steps) and the two consumer warpgroups take one half of the output columns each; a group
  without rows gets a stored zero tile. Groups run largest first, spread evenly over the SMs (``_balanced_item``).
* Weights may be stacked, ``w [G, S, k, n]``: the S products sit side by side in the output (``[R, S*n]``), which
  is how the MoE's W1 and W3 run as one matmul without a copy into ``[G, k, S*n]`` (the kernels pick each block's
  matrix from its column or depth index).
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

# Launch shapes from H100 sweeps at the small preset's MoE shapes (docs/benchmarks.md). gmm: rows per consumer
# warpgroup (the layout tile is twice that), output columns and depth per step, pipeline depth, and the
# persistent grid's traversal (column tiles fastest within bands of ``band`` row tiles).
TUNING = {
    "gmm": {"tile_m": 128, "tile_n": 128, "tile_k": 64, "stages": 4, "band": 4},
    "tgmm": {"tile_k": 128, "tile_n": 128, "tile_rows": 64, "stages": 4, "band": 4},
}
_EPILOGUE = 64  # output tiles of 64 x 64 go through shared memory to global memory, two in flight per warpgroup


def layout_tile() -> int:
    """Rows per tile of the layout this backend wants: one group per CTA tile."""
    return TUNING["gmm"]["tile_m"]


def fits(k: int, n: int, dtype) -> bool:
    """Whether the kernels take a ``[R, k] @ [G, k, n]`` problem (and its transposes) in ``dtype``."""
    gmm, tgmm = TUNING["gmm"], TUNING["tgmm"]
    return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and all(d % gmm["tile_k"] == 0 and d % (2 * gmm["tile_n"]) == 0 for d in (k, n))  # forward, transposed
            and k % tgmm["tile_k"] == 0 and n % (2 * tgmm["tile_n"]) == 0
            and layout_tile() % tgmm["tile_rows"] == 0)


def _num_sms() -> int:
    """Multiprocessors of the target GPU: the abstract mesh's device when lowering ahead of time, else device 0."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.num_cores if device is not None else jax.devices()[0].core_count


def smem_transforms(minor_bytes: int):
    """Tiling and swizzle of a shared-memory block of 16-bit elements whose minor dimension has ``minor_bytes``."""
    swizzle = plgpu.find_swizzle(minor_bytes * 8)
    return plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle)


def _epilogue_smem(dtype):
    """Shared memory of the output epilogue: per consumer warpgroup, two 64 x 64 tiles in flight (see ``_store``)."""
    return plgpu.SMEM((2, 2, _EPILOGUE, _EPILOGUE), dtype, transforms=smem_transforms(_EPILOGUE * 2))


def _row_tile_and_group(info, m_tiles, n_tiles, band, group_end_tiles, num_groups):
    """The persistent loop's (row tile, column tile) and the row tile's group (``num_groups``: unused tile)."""
    m, n = plgpu.planar_snake(info.index[0], (m_tiles, n_tiles), 0, band)
    return m, n, _group_of_tile(group_end_tiles, m, num_groups)


def _group_of_tile(group_end_tiles, tile, num_groups):
    """Group of row tile ``tile``: how many groups end at or before it (``num_groups``: an unused tile)."""
    group = jnp.int32(0)
    for g in range(num_groups):
        group += (tile >= group_end_tiles[g]).astype(jnp.int32)
    return group


def _store(result, out_smem, wg, out_ref):
    """Writes a warpgroup's ``result`` tile to ``out_ref`` through shared memory, 64 x 64 at a time."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    rows, cols = result.shape
    for i in range(rows // _EPILOGUE):
        for j in range(cols // _EPILOGUE):
            slot = (i * (cols // _EPILOGUE) + j) % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[wg, slot] = result[i * _EPILOGUE:(i + 1) * _EPILOGUE, j * _EPILOGUE:(j + 1) * _EPILOGUE]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                    out_ref.at[pl.ds(i * _EPILOGUE, _EPILOGUE), pl.ds(j * _EPILOGUE, _EPILOGUE)])


def _accumulate_then_store(shape, out_smem, wg, out_ref, dtype):
    """A pipeline's compute context: runs the pipeline into a fresh fp32 accumulator of ``shape``, then writes it to
    ``out_ref`` in ``dtype``."""

    def compute(run_pipeline):
        @functools.partial(pl.run_scoped, acc=plgpu.ACC(shape, jnp.float32))
        def accumulate(acc):
            run_pipeline(acc)
            _store(acc[...].astype(dtype), out_smem, wg, out_ref)

    return compute


def _gmm_kernel(group_end_tiles, x_gmem, w_gmem, out_gmem, *, transpose_w, num_groups, stacks, tile_m, tile_n,
                tile_k, stages, band):
    """``w_gmem [G, S*K, N]``: each group's S stacked ``[K, N]`` matrices, whose products are side by side in the
    output (forward: ``out [R, S*N]``; ``transpose_w``: ``out [R, K]`` from ``x [R, S*N]``)."""
    rows, depth = x_gmem.shape
    cols = out_gmem.shape[1]
    stacked_k, w_cols = w_gmem.shape[1:]
    w_depth = stacked_k // stacks  # K of one stacked matrix
    cta_n = 2 * tile_n
    m_tiles, n_tiles, k_steps = rows // tile_m, cols // cta_n, depth // tile_k
    in_transforms = smem_transforms(tile_k * 2)
    w_block = (cta_n, tile_k) if transpose_w else (tile_k, cta_n)

    def pipeline(mma_body, compute_context, w_index):
        return plgpu.emit_pipeline_warp_specialized(
            mma_body, grid=(k_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=stages, compute_context=compute_context,
            in_specs=[
                plgpu.BlockSpec((tile_m, tile_k), lambda k: (0, k), transforms=in_transforms,
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec(w_block, w_index, transforms=in_transforms, memory_space=plgpu.SMEM),
            ])

    def unused(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(unused, unused, lambda k: (0, k)).get_allocations(x_gmem, w_gmem.at[0]),
        out_smem=_epilogue_smem(out_gmem.dtype),
        collective_axes="wg",
    )
    def scope(allocations, out_smem):
        wg = lax.axis_index("wg")
        wg_cols = pl.ds(wg * tile_n, tile_n)

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def tile_loop(info: plgpu.NDLoopInfo):
            m, n, group = _row_tile_and_group(info, m_tiles, n_tiles, band, group_end_tiles, num_groups)
            cta_rows, cta_cols = pl.ds(m * tile_m, tile_m), pl.ds(n * cta_n, cta_n)
            if transpose_w:  # depth step k reads stacked matrix k // steps_per_matrix; output columns n of its K
                steps_per_matrix = w_cols // tile_k

                def w_index(k):
                    return (k // steps_per_matrix) * (w_depth // cta_n) + n, k % steps_per_matrix
            else:  # output column tile n is column tile n % tiles_per_matrix of stacked matrix n // tiles_per_matrix
                tiles_per_matrix = w_cols // cta_n

                def w_index(k):
                    return (n // tiles_per_matrix) * (w_depth // tile_k) + k, n % tiles_per_matrix

            def mma(_, x_smem, w_smem, acc):
                w_wg = w_smem.at[wg_cols].transpose((1, 0)) if transpose_w else w_smem.at[:, wg_cols]
                plgpu.wgmma(acc, x_smem, w_wg)
                plgpu.wgmma_wait(0)
                return acc

            compute = _accumulate_then_store((tile_m, tile_n), out_smem, wg,
                                             out_gmem.at[cta_rows, cta_cols].at[:, wg_cols], out_gmem.dtype)

            @pl.when(group < num_groups)
            def _():
                pipeline(mma, compute, w_index)(x_gmem.at[cta_rows, :], w_gmem.at[group], allocations=allocations)

            # unused rows: the consumer warpgroups store zero accumulators (a masking pass over the output cost
            # 50 us per MoE layer where no fusion absorbed it)
            @pl.when((group == num_groups) & (wg < 2))
            def _():
                compute(lambda acc: None)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gmm(x, w, group_sizes, *, transpose_w=False):
    """Per contiguous row group g of ``group_sizes`` rows (multiples of ``layout_tile()``), ``x @ [w[g, 0] | ... |
    w[g, S-1]]`` for ``w [G, S, k, n]`` (``[R, S*n]``), or with ``transpose_w`` ``x @ [w[g, 0] | ...].T``
    (``x [R, S*n]``, ``[R, k]``); zeros past ``sum(group_sizes)``."""
    num_groups, stacks, depth, width = w.shape
    cols = depth if transpose_w else stacks * width
    group_end_tiles = jnp.cumsum(group_sizes) // layout_tile()
    kernel = plgpu.kernel(
        functools.partial(_gmm_kernel, transpose_w=transpose_w, num_groups=num_groups, stacks=stacks,
                          **TUNING["gmm"]),
        out_type=jax.ShapeDtypeStruct((x.shape[0], cols), x.dtype),
        grid=(_num_sms(),), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(group_end_tiles.astype(jnp.int32), x, w.reshape(num_groups, stacks * depth, width))


def _gmm_swiglu_kernel(group_end_tiles, x_gmem, w_gmem, row_weight_gmem, gate_up_gmem, hidden_gmem, *, num_groups,
                       tile_m, tile_n, tile_k, stages, band):
    """``x @ [W1 | W3]`` and ``row_weight * silu(x W1) * (x W3)`` per row group: ``w_gmem [G, 2*K, N]`` (W1 over
    W3), ``row_weight [R]`` fp32, ``gate_up [R, 2N]``, ``hidden [R, N]``. A CTA tile is ``tile_m`` rows by the same
    ``tile_n`` columns of W1 and of W3; each consumer warpgroup takes half of those columns of both, so it holds gate
    and up of the same elements and forms SwiGLU in registers. Unused row tiles are written as zeros (hidden feeds a
    kernel, not a fusion)."""
    rows, depth = x_gmem.shape
    width = hidden_gmem.shape[1]
    half = tile_n // 2
    m_tiles, n_tiles, k_steps = rows // tile_m, width // tile_n, depth // tile_k
    in_transforms = smem_transforms(tile_k * 2)

    def pipeline(mma_body, compute_context, n):
        def w_spec(matrix):  # W1 (matrix 0) or W3 (matrix 1): row blocks k_steps apart in the stacked view
            return plgpu.BlockSpec((tile_k, tile_n), lambda k: (matrix * k_steps + k, n), transforms=in_transforms,
                                   memory_space=plgpu.SMEM)

        return plgpu.emit_pipeline_warp_specialized(
            mma_body, grid=(k_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=stages, compute_context=compute_context,
            in_specs=[plgpu.BlockSpec((tile_m, tile_k), lambda k: (0, k), transforms=in_transforms,
                                      memory_space=plgpu.SMEM), w_spec(0), w_spec(1)])

    def unused(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(unused, unused, 0).get_allocations(x_gmem, w_gmem.at[0], w_gmem.at[0]),
        out_smem=_epilogue_smem(hidden_gmem.dtype),
        collective_axes="wg",
    )
    def scope(allocations, out_smem):
        wg = lax.axis_index("wg")
        wg_half = pl.ds(wg * half, half)

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def tile_loop(info: plgpu.NDLoopInfo):
            m, n, group = _row_tile_and_group(info, m_tiles, n_tiles, band, group_end_tiles, num_groups)
            cta_rows = pl.ds(m * tile_m, tile_m)

            def mma(_, x_smem, gate_smem, up_smem, accs):
                acc_gate, acc_up = accs
                plgpu.wgmma(acc_gate, x_smem, gate_smem.at[:, wg_half])
                plgpu.wgmma(acc_up, x_smem, up_smem.at[:, wg_half])
                plgpu.wgmma_wait(0)
                return accs

            def compute(run_pipeline):
                @functools.partial(pl.run_scoped, acc_gate=plgpu.ACC((tile_m, half), jnp.float32),
                                   acc_up=plgpu.ACC((tile_m, half), jnp.float32))
                def accumulate(acc_gate, acc_up):
                    run_pipeline((acc_gate, acc_up))
                    dtype = hidden_gmem.dtype
                    gate, up = acc_gate[...].astype(dtype), acc_up[...].astype(dtype)
                    cols = n * tile_n + wg * half
                    _store(gate, out_smem, wg, gate_up_gmem.at[cta_rows, pl.ds(cols, half)])
                    _store(up, out_smem, wg, gate_up_gmem.at[cta_rows, pl.ds(width + cols, half)])
                    # each thread reads the weights of its own accumulator rows straight from global memory
                    row_weight = plgpu.load(row_weight_gmem.at[cta_rows], layout=plgpu.Layout.WGMMA.reduce(1),
                                            optimized=False)
                    hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
                              * row_weight[:, None])  # as weighted_swiglu() on bf16 gate and up
                    _store(hidden.astype(dtype), out_smem, wg, hidden_gmem.at[cta_rows, pl.ds(cols, half)])

            @pl.when(group < num_groups)
            def _():
                pipeline(mma, compute, n)(x_gmem.at[cta_rows, :], w_gmem.at[group], w_gmem.at[group],
                                          allocations=allocations)

            @pl.when((group == num_groups) & (wg < 2))  # unused rows: zero accumulators, stored as zeros
            def _():
                compute(lambda accs: None)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gmm_swiglu(x, w13, group_sizes, row_weight):
    """``(gate_up, hidden)``: ``gate_up = x @ [w13[g, 0] | w13[g, 1]]`` (``[R, 2n]``) and ``hidden = row_weight *
    silu(gate) * up`` (``[R, n]``, ``row_weight`` fp32 ``[R]``) per row group, in one kernel; both zero past
    ``sum(group_sizes)``."""
    num_groups, stacks, depth, width = w13.shape
    if stacks != 2:
        raise ValueError(f"gmm_swiglu: w13 must stack W1 and W3 ([G, 2, k, n]), got {w13.shape}")
    group_end_tiles = jnp.cumsum(group_sizes) // layout_tile()
    kernel = plgpu.kernel(
        functools.partial(_gmm_swiglu_kernel, num_groups=num_groups, **TUNING["gmm"]),
        out_type=(jax.ShapeDtypeStruct((x.shape[0], 2 * width), x.dtype),
                  jax.ShapeDtypeStruct((x.shape[0], width), x.dtype)),
        grid=(_num_sms(),), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(group_end_tiles.astype(jnp.int32), x, w13.reshape(num_groups, 2 * depth, width),
                  row_weight.astype(jnp.float32))


def _balanced_item(index, num_items):
    """The work item that persistent-loop step ``index`` runs, for items sorted by decreasing cost: odd rounds of
    ``num_sms`` steps walk their items backwards, so an SM that got a costly item in one round gets a cheap one in
    the next (a greedy longest-first schedule; plain interleaving gives the first SMs the costliest item of every
    round)."""
    num_sms = lax.axis_size("sm")
    round_, position = index // num_sms, index % num_sms
    round_size = jnp.minimum(num_sms, num_items - round_ * num_sms)
    return round_ * num_sms + jnp.where(round_ % 2 == 1, round_size - 1 - position, position)


def _tgmm_kernel(group_order, group_starts, group_steps, x_gmem, dy_gmem, out_gmem, *, tile_k, tile_n, tile_rows,
                 stages, band):
    """``out_gmem [G, S*K, N]``: per group, ``x_g^T @ dy_g`` with the ``S*N`` columns of ``dy`` cut into S stacked
    ``[K, N]`` matrices (the weight layout of ``gmm``). Groups without rows get zeros. A group's output tiles each
    cost its row count, so the loop takes the groups in ``group_order`` (largest first) and balances the SMs' work
    with ``_balanced_item``: with uneven expert loads, group order left the SMs that held a large group's tiles
    finishing last."""
    rows, depth = x_gmem.shape
    cols = dy_gmem.shape[1]
    num_groups, _, w_cols = out_gmem.shape
    cta_n = 2 * tile_n
    k_tiles, n_tiles = depth // tile_k, cols // cta_n
    tiles_per_matrix = w_cols // cta_n
    x_transforms = smem_transforms(tile_k * 2)
    dy_transforms = smem_transforms(min(cta_n, 64) * 2)

    def pipeline(mma_body, compute_context, steps):
        return plgpu.emit_pipeline_warp_specialized(
            mma_body, grid=(steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=stages, compute_context=compute_context,
            in_specs=[
                plgpu.BlockSpec((tile_rows, tile_k), lambda r: (r, 0), transforms=x_transforms,
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tile_rows, cta_n), lambda r: (r, 0), transforms=dy_transforms,
                                memory_space=plgpu.SMEM),
            ])

    def unused(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        # a static grid of ``stages`` steps sizes the buffers for the full pipeline depth (a shorter static grid
        # would shrink them); the real pipelines below have a dynamic number of steps
        allocations=pipeline(unused, unused, stages).get_allocations(x_gmem, dy_gmem),
        out_smem=_epilogue_smem(out_gmem.dtype),
        collective_axes="wg",
    )
    def scope(allocations, out_smem):
        wg = lax.axis_index("wg")
        wg_cols = pl.ds(wg * tile_n, tile_n)

        tiles = k_tiles * n_tiles

        @plgpu.nd_loop((num_groups * tiles,), collective_axes="sm")
        def tile_loop(info: plgpu.NDLoopInfo):
            item = _balanced_item(info.index[0], num_groups * tiles)
            group = group_order[item // tiles]
            kt, nt = plgpu.planar_snake(item % tiles, (k_tiles, n_tiles), 0, band)
            matrix, matrix_nt = nt // tiles_per_matrix, nt % tiles_per_matrix
            out_block = out_gmem.at[group, pl.ds(matrix * depth + kt * tile_k, tile_k),
                                    pl.ds(matrix_nt * cta_n, cta_n)]
            steps = group_steps[group]
            # a window of all rows starting at the group's first row; the pipeline reads only its ``steps`` blocks
            group_rows = pl.ds(pl.multiple_of(group_starts[group], tile_rows), rows)

            def mma(_, x_smem, dy_smem, acc):
                plgpu.wgmma(acc, x_smem.transpose((1, 0)), dy_smem.at[:, wg_cols])
                plgpu.wgmma_wait(0)
                return acc

            compute = _accumulate_then_store((tile_k, tile_n), out_smem, wg, out_block.at[:, wg_cols], out_gmem.dtype)

            @pl.when(steps > 0)
            def _():
                pipeline(mma, compute, steps)(x_gmem.at[group_rows, pl.ds(kt * tile_k, tile_k)],
                                              dy_gmem.at[group_rows, pl.ds(nt * cta_n, cta_n)],
                                              allocations=allocations)

            @pl.when((steps == 0) & (wg < 2))  # the consumer warpgroups store a zero accumulator
            def _():
                compute(lambda acc: None)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm(x, dy, group_sizes, stacks=1):
    """``[G, S, k, n]`` (``x [R, k]``, ``dy [R, S*n]``): per row group, ``x_g^T @ dy_g`` with the columns of ``dy``
    as S stacked matrices (the layout of ``gmm``'s ``w``); zeros for an empty group."""
    knobs = TUNING["tgmm"]
    num_groups, depth, width = group_sizes.shape[0], x.shape[1], dy.shape[1] // stacks
    ends = jnp.cumsum(group_sizes).astype(jnp.int32)
    kernel = plgpu.kernel(
        functools.partial(_tgmm_kernel, **knobs),
        out_type=jax.ShapeDtypeStruct((num_groups, stacks * depth, width), x.dtype),
        grid=(_num_sms(),), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    largest_first = jnp.argsort(-group_sizes.astype(jnp.int32), stable=True).astype(jnp.int32)
    dw = kernel(largest_first, ends - group_sizes.astype(jnp.int32),
                (group_sizes // knobs["tile_rows"]).astype(jnp.int32), x, dy)
    return dw.reshape(num_groups, stacks, depth, width)
