"""Times the cross-entropy gradient of one chunk of logits (Pallas-Triton kernel vs XLA) and the whole chunked
loss of the `small` preset's training step; prints a markdown table.

    PYTHONPATH=. python3 scripts/bench_loss.py --out_md=$OUT/bench_loss.md            # H100
    PYTHONPATH=. python3 scripts/bench_loss.py --sweep                                 # launch knobs

Shapes: the `small` preset's 8 x 8K-token batch and 65,536-token vocabulary; loss chunks of ``--chunk`` positions
(1,024 by default, as in docs/benchmarks.md; the preset now uses 2,048), so one chunk's logits are
``[8 * 1024, 65536]`` bf16 (1 GiB).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from absl import app, flags

from minimax_jax.timing import median_ms, report
from minimax_jax.train.loss import chunked_cross_entropy_sum
from pallas_kernels import cross_entropy

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "rows")
flags.DEFINE_integer("seq", 8192, "tokens per row")
flags.DEFINE_integer("chunk", 1024, "loss chunk (positions)")
flags.DEFINE_integer("hidden", 1024, "hidden size")
flags.DEFINE_integer("vocab", 65536, "vocabulary")
flags.DEFINE_integer("trials", 7, "timing trials (median)")
flags.DEFINE_bool("sweep", False, "time the kernel over launch knobs (max_tile, num_warps)")
flags.DEFINE_string("out_md", "", "also write the markdown here")


def chunk_inputs(rows: int, vocab: int):
    keys = jax.random.split(jax.random.key(0), 3)
    logits = (4 * jax.random.normal(keys[0], (rows, vocab), jnp.float32)).astype(jnp.bfloat16)
    targets = jax.random.randint(keys[1], (rows,), 0, vocab)
    mask = (jax.random.uniform(keys[2], (rows,)) > 0.05).astype(jnp.float32)
    return logits, targets, mask


def kernel(logits, targets, mask):
    """The Pallas-Triton kernel (interpreted off GPUs, for a smoke run)."""
    return cross_entropy.softmax_cross_entropy_grad_kernel(logits, targets, mask,
                                                           interpret=jax.default_backend() != "gpu")


def time_gradient(fn, args) -> float:
    """ms per call on a fresh copy of the logits (the kernel overwrites them; XLA fuses the copy away, the kernel
    pays for it: see the copy row)."""
    return median_ms(jax.jit(lambda x, t, m: fn(x + 0, t, m)), *args, trials=FLAGS.trials)


def main(argv) -> None:
    del argv
    rows, vocab = FLAGS.batch * FLAGS.chunk, FLAGS.vocab
    args = chunk_inputs(rows, vocab)
    gib = rows * vocab * 2 / 2**30
    lines = [f"Cross-entropy gradient on {jax.devices()[0].device_kind}: logits [{rows}, {vocab}] bf16 "
             f"({gib:.2f} GiB; reading them once takes {gib * 2**30 / 3.35e12 * 1e3:.3f} ms at 3.35 TB/s).", ""]
    if FLAGS.sweep:
        lines += ["| max_tile | num_warps | ms (with the copy) |", "|---:|---:|---:|"]
        for tile, warps in itertools.product([4096, 8192, 16384, 32768], [4, 8, 16, 32]):
            cross_entropy.LAUNCH.update(max_tile=tile, num_warps=warps)
            cross_entropy.softmax_cross_entropy_grad_kernel.clear_cache()  # the knobs are read at trace time
            try:
                ms = time_gradient(kernel, args)
            except Exception as error:  # noqa: BLE001 - a knob set that does not compile is a row, not a crash
                lines.append(f"| {tile} | {warps} | failed: {type(error).__name__} |")
                continue
            lines.append(f"| {tile} | {warps} | {ms:.3f} |")
            print(lines[-1], flush=True)
    else:
        kernel_ms = time_gradient(kernel, args)
        xla_ms = time_gradient(cross_entropy.softmax_cross_entropy_grad, args)
        copy_ms = median_ms(jax.jit(lambda x: x + 0), args[0], trials=FLAGS.trials)
        net_ms = kernel_ms - copy_ms
        got = jax.jit(kernel)(args[0] + 0, *args[1:])
        want = jax.jit(cross_entropy.softmax_cross_entropy_grad)(*args)
        errors = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                  for g, w in zip(got, want, strict=True)]
        keys = jax.random.split(jax.random.key(1), 2)
        hidden = jax.random.normal(keys[0], (FLAGS.batch, FLAGS.seq, FLAGS.hidden), jnp.bfloat16)
        lm_head = 0.02 * jax.random.normal(keys[1], (FLAGS.hidden, vocab), jnp.float32)
        targets = jax.random.randint(keys[1], (FLAGS.batch, FLAGS.seq), 0, vocab)
        mask = jnp.ones((FLAGS.batch, FLAGS.seq), jnp.float32)
        loss_grad = jax.jit(jax.value_and_grad(
            lambda h, w: chunked_cross_entropy_sum(h, w, targets, mask, FLAGS.chunk), argnums=(0, 1)))
        loss_ms = median_ms(loss_grad, hidden, lm_head, trials=FLAGS.trials)
        matmul_flops = 6 * FLAGS.batch * FLAGS.seq * FLAGS.hidden * vocab
        lines += ["| what | ms | vs XLA |", "|---|---:|---:|",
                  f"| gradient, XLA (3 passes) | {xla_ms:.3f} | 1.00x |",
                  f"| copy of the logits (x + 0) | {copy_ms:.3f} | |",
                  f"| gradient, Pallas-Triton kernel incl. the copy | {kernel_ms:.3f} | {xla_ms / kernel_ms:.2f}x |",
                  f"| gradient, Pallas-Triton kernel net of the copy | {net_ms:.3f} | {xla_ms / net_ms:.2f}x |",
                  f"| whole chunked loss + gradients ({FLAGS.seq // FLAGS.chunk} chunks, kernel) | {loss_ms:.3f} | "
                  f"{matmul_flops / loss_ms / 1e9:.0f} TFLOP/s of its matmuls |", "",
                  f"Kernel vs XLA, max abs difference: row losses {errors[0]:.2e}, logit gradients {errors[1]:.2e}."]
    text = "\n".join(lines)
    report(text, FLAGS.out_md)


if __name__ == "__main__":
    app.run(main)
