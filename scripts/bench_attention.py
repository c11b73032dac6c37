"""Times the softmax-attention kernels on packed causal sequences (the training shape of the `small` preset) and
checks them against the fp32 XLA path; prints a markdown table.

    PYTHONPATH=. python3 scripts/bench_attention.py --out_md=$OUT/bench_attention.md          # H100
    PYTHONPATH=. python3 scripts/bench_attention.py --batch=1 --seq=256 --check_seq=128 --impls=tokamax_xla

Every kernel computes the same function (causal GQA attention, each token sees only its own document) except
``cudnn``, which is given no segments (``jax.nn.dot_product_attention`` takes no segment ids): it is a speed
reference for plain causal attention. ``cudnn_packed`` is cuDNN's packed-sequence path (jax's internal
``cudnn.fused_attention_stablehlo`` API with per-row segment lengths and start offsets), a candidate for the model
if its check matches. FLOPs are those of plain causal attention (``4 * B * H * T^2 * D / 2`` forward, 2.5x that
backward), so kernels that skip cross-document blocks show a higher rate than the work they did.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from minimax_jax.config import small
from minimax_jax.model import attention
from minimax_jax.model.attention import causal_gqa_attention, tokamax_gqa_attention
from minimax_jax.timing import median_ms, report
from pallas_kernels.lightning.ops import segment_index

_SMALL = small()
FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 4, "rows")
flags.DEFINE_integer("seq", 8192, "tokens per row")
flags.DEFINE_integer("heads", _SMALL.num_attention_heads, "query heads")
flags.DEFINE_integer("kv_heads", _SMALL.num_key_value_heads, "key/value heads")
flags.DEFINE_integer("head_dim", _SMALL.head_dim, "head dimension")
flags.DEFINE_integer("documents", 4, "documents packed in each row (random lengths)")
flags.DEFINE_integer("max_segments", 64, "cudnn_packed: most segments a row may hold (a static shape)")
flags.DEFINE_integer("check_seq", 2048, "sequence length of the correctness check (batch 1); 0 skips it")
flags.DEFINE_list("impls", ["jax_pallas_triton", "tokamax_mosaic_gpu", "tokamax_triton", "cudnn"],
                  "kernels to time")
flags.DEFINE_integer("trials", 7, "timing trials (median)")
flags.DEFINE_string("out_md", "", "also write the markdown here")


def jax_pallas_triton(q, k, v, segment_ids):
    """The peer: jax's (deprecated) Pallas-Triton flash attention, which the model used before tokamax's kernels
    (kv heads repeated, segment ids as run indices, forward tiles 128 x 64, backward 64 x 64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention

    blocks = attention.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                                  block_kv_dq=64)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    return attention.mha(q, k, v, segment_index(segment_ids), sm_scale=q.shape[-1] ** -0.5, causal=True,
                         block_sizes=blocks, interpret=jax.default_backend() != "gpu")


def packed_lengths_and_offsets(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Lengths ``[B, M]`` and start offsets ``[B, M + 1]`` of each row's segments (contiguous runs), padded with -1:
    the packed layout of jax's cuDNN attention (the offsets list segment starts only; jax appends the end)."""
    index = segment_index(segment_ids)
    count = index[:, -1:] + 1
    used = jnp.arange(max_segments)[None] < count
    lengths = jax.vmap(lambda row: jnp.bincount(row, length=max_segments))(index).astype(jnp.int32)
    starts = jnp.cumsum(lengths, axis=1) - lengths
    pad = jnp.full((segment_ids.shape[0], 1), -1, jnp.int32)
    return jnp.where(used, lengths, -1), jnp.concatenate([jnp.where(used, starts, -1), pad], axis=1)


def cudnn_packed(q, k, v, segment_ids):
    """cuDNN flash attention over packed documents: padding-causal mask within each segment."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    if FLAGS.documents > FLAGS.max_segments:
        raise ValueError(f"--documents={FLAGS.documents} exceeds --max_segments={FLAGS.max_segments}")
    lengths, offsets = packed_lengths_and_offsets(segment_ids, FLAGS.max_segments)
    return cudnn.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                       kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                       mask_type=cudnn.MaskType.PADDING_CAUSAL)


KERNELS: dict[str, Callable] = {
    "jax_pallas_triton": jax_pallas_triton,
    "tokamax_mosaic_gpu": lambda q, k, v, s: tokamax_gqa_attention(q, k, v, segment_ids=s, kernels=("mosaic_gpu",)),
    # the same forward kernel with tokamax's own backward kernels instead of pallas_kernels/document_attention.py
    "tokamax_mosaic_gpu_own_bwd": lambda q, k, v, s: tokamax_gqa_attention(q, k, v, segment_ids=s,
                                                                           kernels=("mosaic_gpu",)),
    "tokamax_triton": lambda q, k, v, s: tokamax_gqa_attention(q, k, v, segment_ids=s, kernels=("triton",)),
    "tokamax_xla": lambda q, k, v, s: tokamax_gqa_attention(q, k, v, segment_ids=s, kernels=("xla",)),
    "cudnn": lambda q, k, v, s: causal_gqa_attention(q, k, v, implementation="cudnn"),  # no segments
    "cudnn_packed": cudnn_packed,
    "xla": lambda q, k, v, s: causal_gqa_attention(q, k, v, segment_ids=s, implementation="xla"),
}


def inputs(batch: int, seq: int, dtype, seed: int = 0):
    """Random q, k, v and segment ids of ``FLAGS.documents`` documents per row with random boundaries."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, seq, FLAGS.heads, FLAGS.head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, seq, FLAGS.kv_heads, FLAGS.head_dim), dtype) for key in keys[1:])
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, seq), np.int32)
    for row in segments:
        for cut in np.sort(rng.choice(np.arange(1, seq), FLAGS.documents - 1, replace=False)):
            row[cut:] += 1
    return q, k, v, jnp.asarray(segments)


def forward_backward(fn: Callable, own_backward: bool = False) -> Callable:
    """jit of ``(o, dq, dk, dv)`` for the cotangent ``do``; ``own_backward``: tokamax's backward kernels, not
    ``document_attention``'s."""
    def run(q, k, v, segments, do):
        with mock.patch.object(attention, "_document_backward_fits", lambda *_: False) if own_backward else (
                contextlib.nullcontext()):
            out, vjp = jax.vjp(lambda q_, k_, v_: fn(q_, k_, v_, segments), q, k, v)
            return (out, *vjp(do))
    return jax.jit(run)


def check_lines() -> list[str]:
    """Relative error norms of each kernel's output and gradients (bf16) against the XLA path in fp32."""
    q, k, v, segments = inputs(1, FLAGS.check_seq, jnp.float32, seed=1)
    do = jax.random.normal(jax.random.key(2), q.shape, jnp.float32)
    want = forward_backward(KERNELS["xla"])(q, k, v, segments, do)
    lines = [f"Check (batch 1, seq {FLAGS.check_seq}, bf16 inputs vs the XLA path in fp32; relative error norms of "
             "o, dq, dk, dv):", ""]
    for name in FLAGS.impls:
        if name == "cudnn":
            continue
        bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        got = forward_backward(KERNELS[name], name.endswith("_own_bwd"))(*bf16, segments, do.astype(jnp.bfloat16))
        errors = [float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
                  for g, w in zip(got, want, strict=True)]
        lines.append(f"- {name}: " + ", ".join(f"{e:.2e}" for e in errors))
    return lines


def main(argv) -> None:
    del argv
    batch, seq, heads, dim = FLAGS.batch, FLAGS.seq, FLAGS.heads, FLAGS.head_dim
    q, k, v, segments = inputs(batch, seq, jnp.bfloat16)
    do = jax.random.normal(jax.random.key(3), q.shape, jnp.bfloat16)
    fwd_flops = 4 * batch * heads * seq * seq * dim / 2
    rows = []
    for name in FLAGS.impls:
        fn = KERNELS[name]
        fwd_ms = median_ms(jax.jit(fn), q, k, v, segments, trials=FLAGS.trials)
        bwd_ms = median_ms(forward_backward(fn, name.endswith("_own_bwd")), q, k, v, segments, do, trials=FLAGS.trials)
        rows.append((name, fwd_ms, bwd_ms))
        print(name, fwd_ms, bwd_ms, flush=True)
    base_ms = next((both_ms for name, _, both_ms in rows if name == "jax_pallas_triton"), None)
    lines = [f"Softmax attention on {jax.devices()[0].device_kind}: batch {batch}, seq {seq}, {heads} heads, "
             f"{FLAGS.kv_heads} kv heads, head_dim {dim}, bf16, causal, {FLAGS.documents} documents per row "
             "(cudnn: no segments).", "",
             "| kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd vs jax_pallas_triton |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, fwd_ms, both_ms in rows:
        ratio = f"{base_ms / both_ms:.2f}x" if base_ms else "-"
        lines.append(f"| {name} | {fwd_ms:.3f} | {both_ms:.3f} | {fwd_flops / fwd_ms / 1e9:.0f} | "
                     f"{3.5 * fwd_flops / both_ms / 1e9:.0f} | {ratio} |")
    if FLAGS.check_seq:
        lines += ["", *check_lines()]
    text = "\n".join(lines)
    report(text, FLAGS.out_md)


if __name__ == "__main__":
    app.run(main)
