"""Times ``weight * rmsnorm(a * x + b * y)`` forward and forward+backward: the Pallas-Triton kernels of
``pallas_kernels/add_rms_norm.py`` against XLA's autodiff of the same jnp function; prints a markdown table.

    PYTHONPATH=. python3 scripts/bench_norm.py --out_md=$OUT/bench_norm.md          # H100
    PYTHONPATH=. python3 scripts/bench_norm.py --sweep                               # launch knobs

Shape: the `small` preset's 8 x 8K-token batch, hidden 1024, bf16. The output has two consumers, as in the decoder
layer, so the backward pass gets two cotangents (XLA adds them; the kernel reads both).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from absl import app, flags

from minimax_jax.timing import median_ms, report
from pallas_kernels import add_rms_norm as norm_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "rows")
flags.DEFINE_integer("seq", 8192, "tokens per row")
flags.DEFINE_integer("hidden", 1024, "hidden size")
flags.DEFINE_integer("trials", 7, "timing trials (median)")
flags.DEFINE_bool("sweep", False, "time the kernels over launch knobs (rows, num_warps, backward_blocks)")
flags.DEFINE_string("out_md", "", "also write the markdown here")

SCALES = jnp.array([3.5565588200778455, 1.0])
EPS = 1e-5


def inputs(batch: int, seq: int, hidden: int):
    keys = jax.random.split(jax.random.key(0), 5)
    x, y, g1, g2 = (jax.random.normal(k, (batch, seq, hidden), jnp.float32).astype(jnp.bfloat16) for k in keys[:4])
    return x, y, 1.0 + 0.1 * jax.random.normal(keys[4], (hidden,), jnp.float32), g1, g2


def timed_pair(use_kernel: bool, args) -> tuple[float, float]:
    """(forward ms, forward+backward ms); jitted afresh so launch knobs changed since are traced in."""
    interpret = jax.default_backend() != "gpu"

    def norm(x, y, w):
        return norm_lib.add_rms_norm(x, y, w, SCALES, EPS, use_kernel=use_kernel, interpret=interpret)

    def forward_backward(x, y, w, g1, g2):
        outs, vjp = jax.vjp(norm, x, y, w)
        return outs[0], vjp((g1, g2))

    forward = median_ms(jax.jit(lambda x, y, w: norm(x, y, w)[0]), *args[:3], trials=FLAGS.trials)
    return forward, median_ms(jax.jit(forward_backward), *args, trials=FLAGS.trials)


def main(argv) -> None:
    del argv
    args = inputs(FLAGS.batch, FLAGS.seq, FLAGS.hidden)
    tensor_gb = args[0].size * 2 / 1e9
    copy_ms = median_ms(jax.jit(lambda x, y: x + y), args[0], args[1], trials=FLAGS.trials)
    lines = [f"add_rms_norm on {jax.devices()[0].device_kind}: [{FLAGS.batch}, {FLAGS.seq}, {FLAGS.hidden}] bf16 "
             f"({tensor_gb:.3f} GB per tensor). Traffic counted: forward 3 tensors (x, y read; out written), "
             f"backward 6 (two cotangents, x, y read; dx, dy written). Reference `x + y` (3 tensors): "
             f"{copy_ms:.3f} ms, {3 * tensor_gb / copy_ms:.2f} TB/s.", "",
             "| implementation | fwd ms | fwd+bwd ms | bwd ms (difference) | fwd TB/s | bwd TB/s | fwd+bwd vs XLA |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = {}
    for name, use_kernel in (("xla (autodiff of the jnp form)", False), ("pallas-triton kernels", True)):
        rows[name] = timed_pair(use_kernel, args)
    xla_total = rows["xla (autodiff of the jnp form)"][1]
    for name, (fwd, total) in rows.items():
        bwd = total - fwd
        lines.append(f"| {name} | {fwd:.3f} | {total:.3f} | {bwd:.3f} | {3 * tensor_gb / fwd:.2f} | "
                     f"{6 * tensor_gb / bwd:.2f} | {xla_total / total:.2f}x |")
    if FLAGS.sweep:
        lines += ["", "| rows | num_warps | backward_blocks | fwd ms | fwd+bwd ms |", "|---:|---:|---:|---:|---:|"]
        default = dict(norm_lib.LAUNCH)
        for block_rows, warps, blocks in itertools.product((4, 8, 16), (4, 8), (16, 64)):
            norm_lib.LAUNCH.update(rows=block_rows, num_warps=warps, backward_blocks=blocks)
            try:
                fwd, total = timed_pair(True, args)
            except Exception as error:  # noqa: BLE001 (a launch shape that does not compile is reported)
                lines.append(f"| {block_rows} | {warps} | {blocks} | failed: {type(error).__name__} | |")
                continue
            lines.append(f"| {block_rows} | {warps} | {blocks} | {fwd:.3f} | {total:.3f} |")
        norm_lib.LAUNCH.update(default)
    report("\n".join(lines), FLAGS.out_md)


if __name__ == "__main__":
    app.run(main)
