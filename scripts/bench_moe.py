"""Times one MoE layer forward+backward (router, sort, three grouped matmuls, combine) against a bf16 matmul measured
in the same run, a dense-equivalent SwiGLU MLP and a one-hot dispatch einsum baseline; prints a markdown table.

    PYTHONPATH=. python3 scripts/bench_moe.py --out_md=$OUT/bench_moe.md          # H100: 32K tokens, small widths
    PYTHONPATH=. python3 scripts/bench_moe.py --tokens=256 --hidden=32 --inter=16 --peak_size=256 --dtype=float32

FLOPs are model FLOPs: the expert matmuls of the k routed slots per token (2 * T * k * hidden * inter * 3 forward,
twice that backward) plus the router; every variant is credited with the same useful FLOPs, so a variant that does
extra work (padding, one-hot dispatch) shows a lower rate. The one-hot baseline uses a capacity factor and may drop
tokens (reported); the dropless MoE never does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from minimax_jax.config import small
from minimax_jax.model.moe import dropless_experts, route
from minimax_jax.model.moe_dispatch import tile_layout, to_rows
from minimax_jax.timing import median_ms, report
from minimax_jax.train import profiling
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.grouped_matmul import ops as gmm_ops

FLAGS = flags.FLAGS
_SMALL = small()
flags.DEFINE_integer("tokens", 32768, "tokens in the batch")
flags.DEFINE_integer("experts", _SMALL.num_local_experts, "experts")
flags.DEFINE_integer("top_k", _SMALL.num_experts_per_tok, "experts per token")
flags.DEFINE_integer("hidden", _SMALL.hidden_size, "hidden size (default: the small preset)")
flags.DEFINE_integer("inter", _SMALL.intermediate_size, "expert intermediate size (default: the small preset)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute and weight dtype")
flags.DEFINE_integer("peak_size", 8192, "square matmul size for the reference matmul rate")
flags.DEFINE_integer("group_size", 2048, "tokens per group of the one-hot dispatch baseline")
flags.DEFINE_float("capacity_factor", 1.0, "capacity factor of the one-hot dispatch baseline")
flags.DEFINE_float("load_skew", 0.0, "uneven expert loads: a router-logit bias rising linearly over the experts "
                   "from -load_skew to +load_skew (0: random tokens spread evenly)")
flags.DEFINE_integer("trials", 7, "timing trials (median)")
flags.DEFINE_float("min_trial_s", 0.05, "each timing trial lasts at least this long")
flags.DEFINE_string("out_md", "", "also write the markdown table here")
flags.DEFINE_bool("tune", False, "first sweep the Triton grouped-matmul launch shapes (TUNING) and keep the best")
flags.DEFINE_bool("check", True, "compare the GPU path's values and gradients with the ragged_dot backend")
flags.DEFINE_string("profile_dir", "", "also trace 5 forward+backward calls of the default dropless MoE here, with "
                    "its compiled HLO (read it with scripts/trace_summary.py)")


def time_ms(fn: Callable, *args) -> float:
    """Median milliseconds per call of ``fn`` (compiled and warmed up first)."""
    return median_ms(fn, *args, trials=FLAGS.trials, min_trial_s=FLAGS.min_trial_s)


def router_logits(x, router):
    """``x @ router``, plus the ``--load_skew`` bias per expert."""
    bias = FLAGS.load_skew * jnp.linspace(-1.0, 1.0, router.shape[-1])
    return (x @ router + bias.astype(x.dtype)) if FLAGS.load_skew else x @ router


def dropless_moe(x, router, w13, w2, backend="auto"):
    routing = route(router_logits(x, router), FLAGS.top_k)
    return dropless_experts(x, routing, w13, w2, backend=backend)


def dropless_triton(x, router, w13, w2):
    return dropless_moe(x, router, w13, w2, backend="triton")


def dropless_xla(x, router, w13, w2):
    return dropless_moe(x, router, w13, w2, backend="xla")


def layout_rows(x, router, num_experts: int, tile: int):
    """This run's routing as a tile-aligned layout, and the token rows gathered into it (as the MoE does)."""
    layout = tile_layout(route(router_logits(x, router), FLAGS.top_k).experts.reshape(-1), num_experts, tile)
    return layout, to_rows(x, layout, FLAGS.top_k)


def tune(x, router, w13) -> list[str]:
    """Sweeps gmm (forward + input gradient) and tgmm (weight gradient) launch shapes on this run's layout; sets
    ``gmm_ops.TUNING`` to the fastest of each and returns report lines."""
    tile = gmm_ops.TUNING["tile"]
    layout, rows = layout_rows(x, router, w13.shape[0], tile)
    dy = jnp.ones((rows.shape[0], 2 * w13.shape[-1]), x.dtype)
    lines = []

    def best(name, grid, fn):
        results = []
        for values in grid:
            gmm_ops.TUNING[name] = dict(values)
            try:
                results.append((time_ms(jax.jit(fn), rows, w13, dy), dict(values)))
            except Exception as error:  # noqa: BLE001 - a shape that does not fit (shared memory) is skipped
                lines.append(f"- {name} {dict(values)}: failed ({type(error).__name__})")
        ms, values = min(results, key=lambda r: r[0])
        gmm_ops.TUNING[name] = values
        lines.append(f"- {name}: best {values} at {ms:.3f} ms (of {len(results)} shapes)")
        return ms

    gmm_grid = [dict(tn=tn, bk=bk, num_warps=nw, num_stages=ns) for tn in (64, 128, 256) for bk in (32, 64, 128)
                for nw in (4, 8) for ns in (3, 4)]
    tgmm_grid = [dict(bk=bk, bn=bn, num_warps=nw, num_stages=ns) for bk in (64, 128) for bn in (64, 128, 256)
                 for nw in (4, 8) for ns in (2, 3, 4)]
    best("gmm", gmm_grid, lambda r, w, d: grouped_matmul(r, w, layout.tile_group, tile=tile, backend="triton"))
    best("tgmm", tgmm_grid, lambda r, w, d: jax.vjp(
        lambda w_: grouped_matmul(r, w_, layout.tile_group, tile=tile, backend="triton"), w)[1](d)[0])
    return lines


def matmuls_only_row(x, router, w13, w2, model_flops, peak) -> str:
    """The default path's expert matmuls alone (forward+backward on a prebuilt layout): what routing, layout,
    gathers and the SwiGLU elementwise add on top of them is the difference to the full MoE row."""
    tile = gmm_ops.tile_rows()
    layout, rows = layout_rows(x, router, w13.shape[0], tile)
    inter = w13.shape[-1]

    def matmuls(rows_, w13_, w2_):
        gate_up = grouped_matmul(rows_, w13_, layout.tile_group, tile=tile)
        return grouped_matmul(gate_up[:, :inter], w2_, layout.tile_group, tile=tile)

    def grads(rows_, ct, w13_, w2_):
        out, vjp = jax.vjp(matmuls, rows_, w13_, w2_)
        return out, vjp(ct)

    ct = jnp.ones((rows.shape[0], x.shape[1]), x.dtype)
    ms = time_ms(jax.jit(grads), rows, ct, w13, w2)
    tflops = model_flops / ms / 1e9
    return f"| expert matmuls only (3 grouped matmuls fwd+bwd, prebuilt layout) | {ms:.3f} | {tflops:.1f} | " \
           f"{tflops / peak:.1%} |"


def check(x, router, w13, w2, cotangent) -> str:
    """Largest relative difference (over output and the 4 gradients) of the default path against ragged_dot."""
    def grads(fn):
        return forward_backward(fn)(x, cotangent, router, w13, w2)[1]

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    out = rel(jax.jit(dropless_moe)(x, router, w13, w2), jax.jit(dropless_xla)(x, router, w13, w2))
    errors = [rel(a, b) for a, b in zip(grads(dropless_moe), grads(dropless_xla), strict=True)]
    return (f"Check against the ragged_dot backend ({FLAGS.dtype}): output {out:.2e}; gradients x, router, w13, w2: "
            f"{', '.join(f'{e:.2e}' for e in errors)}.")


def dense_equivalent(x, w1, w3, w2):
    """A SwiGLU MLP of width k * inter: the same matmul FLOPs as the MoE, no routing."""
    return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2


def one_hot_dispatch(x, router, w13, w2):
    """GShard-style: tokens in groups, one-hot [group, slot, expert, capacity] dispatch and combine einsums."""
    tokens, hidden = x.shape
    experts, k, group = w13.shape[0], FLAGS.top_k, FLAGS.group_size
    capacity = max(1, int(np.ceil(group * k / experts * FLAGS.capacity_factor)))
    routing = route(router_logits(x, router), k)
    xg = x.reshape(-1, group, hidden)
    mask = jax.nn.one_hot(routing.experts.reshape(-1, group, k), experts, dtype=jnp.int32)  # [G, S, k, E]
    # position of each (token, choice) in its expert's buffer: earlier tokens first, first choices first
    flat = mask.transpose(0, 2, 1, 3).reshape(mask.shape[0], k * group, experts)
    position = (jnp.cumsum(flat, axis=1) - 1).reshape(mask.shape[0], k, group, experts).transpose(0, 2, 1, 3)
    keep = mask * (position < capacity)
    slot = jax.nn.one_hot(jnp.sum(position * keep, axis=-1), capacity, dtype=x.dtype)  # [G, S, k, C]
    dispatch = jnp.einsum("gske,gskc->gsec", keep.astype(x.dtype), slot)
    weights = routing.weights.reshape(-1, group, k).astype(x.dtype)
    combine = jnp.einsum("gske,gskc,gsk->gsec", keep.astype(x.dtype), slot, weights)
    buffers = jnp.einsum("gsec,gsd->egcd", dispatch, xg)
    gate_up = jnp.einsum("egcd,esdf->segcf", buffers, w13)
    h = jax.nn.silu(gate_up[0]) * gate_up[1]
    out = jnp.einsum("egcf,efd->egcd", h, w2)
    dropped = routing.experts.size - jnp.sum(keep)
    return jnp.einsum("egcd,gsec->gsd", out, combine).reshape(tokens, hidden), dropped


def forward_backward(fn: Callable) -> Callable:
    """jit of ``fn(x, *w)`` and its gradients with respect to x and every weight for the upstream gradient
    ``cotangent`` (in the compute dtype, as a bf16 model's backward pass hands it to the layer). The output is
    returned too: a model's next layer needs it, and without it XLA would drop the forward's last step."""
    def value_and_grads(x, cotangent, *weights):
        def layer(x_, *w):
            y = fn(x_, *w)
            return y[0] if isinstance(y, tuple) else y
        y, vjp = jax.vjp(layer, x, *weights)
        return y, vjp(cotangent)
    return jax.jit(value_and_grads)


def profile(fn: Callable, args: tuple, directory: str) -> None:
    """Traces 5 calls of the compiled ``fn`` into ``directory`` and saves its HLO there (``profiling.HLO_FILE``)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / profiling.HLO_FILE).write_text(fn.lower(*args).compile().as_text())
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(str(path)):
        for _ in range(5):
            out = fn(*args)
        jax.block_until_ready(out)


def main(argv) -> None:
    del argv
    if FLAGS.profile_dir:
        profiling.per_op_gpu_events()
    dtype = jnp.dtype(FLAGS.dtype)
    tokens, hidden, inter, experts, k = FLAGS.tokens, FLAGS.hidden, FLAGS.inter, FLAGS.experts, FLAGS.top_k
    if tokens % FLAGS.group_size:
        raise app.UsageError(f"--tokens={tokens} must be a multiple of --group_size={FLAGS.group_size}")
    keys = jax.random.split(jax.random.key(0), 8)
    normal = lambda key, shape, std: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)  # noqa: E731
    x = normal(keys[0], (tokens, hidden), 1.0)
    cotangent = jax.random.normal(keys[1], (tokens, hidden), jnp.float32).astype(dtype)
    router = normal(keys[2], (hidden, experts), 1 / np.sqrt(hidden))
    w13 = normal(keys[3], (experts, 2, hidden, inter), hidden ** -0.5)
    w2 = normal(keys[5], (experts, inter, hidden), inter ** -0.5)
    d1, d3 = (normal(keys[i], (hidden, k * inter), hidden ** -0.5) for i in (6, 7))
    d2 = normal(keys[0], (k * inter, hidden), inter ** -0.5)

    n = FLAGS.peak_size
    a, b = normal(keys[1], (n, n), 1.0), normal(keys[2], (n, n), 1.0)
    matmul_ms = time_ms(jax.jit(lambda a, b: a @ b), a, b)
    peak = 2 * n ** 3 / matmul_ms / 1e9  # TFLOP/s

    tune_lines = tune(x, router, w13) if FLAGS.tune else []
    check_line = check(x, router, w13, w2, cotangent) if FLAGS.check else ""
    model_flops = 3 * (2 * tokens * k * hidden * inter * 3 + 2 * tokens * hidden * experts)
    counts = np.bincount(np.asarray(route(router_logits(x, router), k).experts).reshape(-1), minlength=experts)
    _, dropped = jax.jit(one_hot_dispatch)(x, router, w13, w2)
    rows = [matmuls_only_row(x, router, w13, w2, model_flops, peak)]
    for name, fn, args in (
            (f"dropless MoE, grouped matmul backend {gmm_ops.resolve_backend('auto')}", dropless_moe,
             (router, w13, w2)),
            ("dropless MoE, grouped matmul backend triton", dropless_triton, (router, w13, w2)),
            ("dropless MoE, grouped matmul backend xla (ragged_dot)", dropless_xla, (router, w13, w2)),
            ("dense-equivalent SwiGLU (width k*inter)", dense_equivalent, (d1, d3, d2)),
            (f"one-hot dispatch einsum (capacity factor {FLAGS.capacity_factor:g})", one_hot_dispatch,
             (router, w13, w2))):
        ms = time_ms(forward_backward(fn), x, cotangent, *args)
        tflops = model_flops / ms / 1e9
        rows.append(f"| {name} | {ms:.3f} | {tflops:.1f} | {tflops / peak:.1%} |")

    device = jax.devices()[0].device_kind
    lines = [
        f"MoE layer forward+backward on {device}: {tokens} tokens, {experts} experts, top-{k}, hidden {hidden}, "
        f"inter {inter}, {dtype.name}. Reference: {n}x{n}x{n} {dtype.name} matmul at {peak:.1f} TFLOP/s "
        f"({matmul_ms:.3f} ms). Expert loads min/max {counts.min()}/{counts.max()} slots (mean "
        f"{tokens * k / experts:.0f}); one-hot baseline dropped {int(dropped)} of {tokens * k} slots. Model FLOPs "
        f"per step: {model_flops / 1e12:.3f} TFLOP.",
        "",
        "| variant | ms (fwd+bwd) | model TFLOP/s | fraction of matmul rate |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        check_line,
        *([f"Tuning (kept): gmm {gmm_ops.TUNING['gmm']}, tgmm {gmm_ops.TUNING['tgmm']}", *tune_lines]
          if tune_lines else []),
    ]
    if FLAGS.profile_dir:
        profile(forward_backward(dropless_moe), (x, cotangent, router, w13, w2), FLAGS.profile_dir)
    table = "\n".join(lines)
    report(table, FLAGS.out_md)


if __name__ == "__main__":
    app.run(main)
