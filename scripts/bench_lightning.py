"""Checks and times lightning attention on a GPU: our triton and xla backends, flash-linear-attention's
``chunk_simple_gla`` and cuDNN causal softmax attention (for scale).

    PYTHONPATH=. python3 scripts/bench_lightning.py --check --bench --out_md=$OUT/bench.md

``--check`` compares against fp32 oracles at small and realistic sizes (relative error norms) and asserts them;
``--bench`` times forward and forward+backward (median ms) and writes a markdown table; ``--tune`` sweeps the
triton launch knobs at one size.
"""

from __future__ import annotations

import datetime
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from minimax_jax.timing import median_ms, report
from pallas_kernels.lightning import lightning_attention, ops
from pallas_kernels.lightning import triton_backend as tb

FLAGS = flags.FLAGS
flags.DEFINE_bool("check", False, "run the correctness checks")
flags.DEFINE_bool("bench", False, "run the benchmark table")
flags.DEFINE_bool("tune", False, "sweep triton launch knobs")
flags.DEFINE_list("seqs", ["4096", "16384", "65536", "262144"], "sequence lengths (batch 1)")
flags.DEFINE_integer("batch_4k", 4, "also time this batch at seq 4096 (0: skip)")
flags.DEFINE_list("impls", ["triton", "xla", "fla", "cudnn"], "implementations to time")
flags.DEFINE_integer("heads", 16, "heads")
flags.DEFINE_integer("dim", 128, "head_dim")
flags.DEFINE_integer("tune_seq", 65536, "sequence length for --tune")
flags.DEFINE_integer("tune_batch", 1, "batch for --tune (the small preset trains on 8 x 8192 with 8 heads)")
flags.DEFINE_list("tune_blocks", ["64"], "block sizes for --tune")
flags.DEFINE_list("tune_programs", ["264", "528", "1056"], "target_programs values for --tune")
flags.DEFINE_list("tune_stages", ["2", "3", "4"], "num_stages values for --tune")
flags.DEFINE_list("tune_tiles", ["64", "128"], "max_tile values for --tune")
flags.DEFINE_list("tune_warps", ["4", "8"], "num_warps values for --tune")
flags.DEFINE_string("out_md", "", "write the markdown table here")
flags.DEFINE_float("min_trial_s", 0.03, "each timing trial lasts at least this long")
flags.DEFINE_integer("trials", 7, "timing trials (median)")
flags.DEFINE_integer("max_cudnn_seq", 262144, "skip cuDNN above this length")
flags.DEFINE_bool("check_large", True, "also check at realistic sizes against the xla backend")

BW = 3.0e12  # measured device-to-device copy, bytes/s (H100, spec)
MM = 705e12  # measured bf16 matmul FLOP/s


def decays(h, layer=0, n_layers=80):
    """MiniMax-01 decay rates of a layer."""
    slopes = 2.0 ** (-8.0 * (np.arange(h) + 1) / h)
    return jnp.asarray(slopes * (1 - layer / (n_layers - 1) + 1e-5), jnp.float32)


def make_inputs(key, b, t, h, d, dtype=jnp.bfloat16):
    """silu(normal) like the model's q, k, v."""
    ks = jax.random.split(key, 4)
    q, k, v = (jax.nn.silu(jax.random.normal(kk, (b, t, h, d), jnp.float32)).astype(dtype) for kk in ks[:3])
    do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def rel(a, b):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(a))):
        return float("nan")
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def time_jax(fn, *args):
    """Median ms per call (``minimax_jax.timing.median_ms``); calls over 1 s get 2 trials."""
    return median_ms(fn, *args, trials=FLAGS.trials, min_trial_s=FLAGS.min_trial_s, slow_call_s=1.0)


def time_torch(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def lightning_fns(backend, decay, segment_ids=None, block_size=None):
    """Jitted forward and forward+backward (returns o and the three gradients)."""

    def f(q, k, v):
        return lightning_attention(q, k, v, decay, segment_ids=segment_ids, backend=backend, block_size=block_size)

    def fb(q, k, v, do):
        o, pull = jax.vjp(f, q, k, v)
        return o, *pull(do)

    return jax.jit(f), jax.jit(fb)


def cudnn_fns():
    def f(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)

    def fb(q, k, v, do):
        o, pull = jax.vjp(f, q, k, v)
        return o, *pull(do)

    return jax.jit(f), jax.jit(fb)


def fla_fns(q, k, v, do, decay):
    import torch
    from fla.ops.simple_gla import chunk_simple_gla

    tq, tk_, tv, tdo = (torch.from_dlpack(x).requires_grad_(x is not do) for x in (q, k, v, do))
    g = -torch.from_dlpack(decay)

    def f():
        return chunk_simple_gla(tq, tk_, tv, g_gamma=g, scale=1.0)[0]

    def fb():
        o = chunk_simple_gla(tq, tk_, tv, g_gamma=g, scale=1.0)[0]
        o.backward(tdo)
        return o

    return f, fb, (tq, tk_, tv)


# ----------------------------------------------------------------------------------------------- checks
def check():
    """Triton vs oracles; prints and asserts relative error norms."""
    lines = []

    def report(name, err, tol):
        ok = err < tol
        lines.append(f"{name}: {err:.3e} (tol {tol:g}) {'ok' if ok else 'FAIL'}")
        print(lines[-1], flush=True)
        return ok

    all_ok = True
    key = jax.random.PRNGKey(0)
    # 1. small, every feature, against the lax.scan reference in fp32.
    for d, dtype in itertools.product([64, 128], [jnp.float32, jnp.bfloat16]):
        key, k1, k2, k3 = jax.random.split(key, 4)
        b, t, h = 2, 1000, 4
        q, k, v, do = make_inputs(k1, b, t, h, d, dtype)
        seg = jnp.sort(jax.random.randint(k2, (b, t), 0, 5), axis=1)
        init = 0.1 * jax.random.normal(k3, (b, h, d, d), jnp.float32)
        decay = decays(h, layer=3)
        dfin = jax.random.normal(k3, (b, h, d, d), jnp.float32)

        def run(backend, q, k, v, init, seg=seg, decay=decay, do=do, dfin=dfin):
            def f(q, k, v, s):
                return lightning_attention(q, k, v, decay, segment_ids=seg, initial_state=s,
                                           return_final_state=True, backend=backend)

            (o, fs), pull = jax.vjp(f, q, k, v, init)
            return (o, fs, *pull((do.astype(o.dtype), dfin)))

        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref = jax.jit(lambda q, k, v, s: run("reference", q, k, v, s))(*f32, init)
        got = jax.jit(lambda q, k, v, s: run("triton", q, k, v, s))(q, k, v, init)
        tol = 1e-4 if dtype == jnp.float32 else 2e-2
        for name, x, y in zip(["o", "final", "dq", "dk", "dv", "dinit"], got, ref, strict=True):
            all_ok &= report(f"small d={d} {jnp.dtype(dtype).name} T={t} segs+init {name} vs reference", rel(x, y), tol)
    # 2. realistic sizes, bf16, against the xla backend on fp32-upcast inputs.
    for t, grads in [(65536, False), (16384, True)] if FLAGS.check_large else []:
        key, k1, k2 = jax.random.split(key, 3)
        b, h, d = 1, FLAGS.heads, FLAGS.dim
        q, k, v, do = make_inputs(k1, b, t, h, d)
        seg = jnp.sort(jax.random.randint(k2, (b, t), 0, 4), axis=1)
        decay = decays(h, layer=10)
        for sid in [None, seg]:
            def f(backend, q, k, v, sid=sid, decay=decay):
                return lightning_attention(q, k, v, decay, segment_ids=sid, return_final_state=True, backend=backend)

            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            tag = f"T={t} b={b} h={h} d={d} bf16 {'segments' if sid is not None else 'one segment'}"
            if not grads:
                ref = jax.jit(lambda q, k, v: f("xla", q, k, v))(*f32)
                got = jax.jit(lambda q, k, v: f("triton", q, k, v))(q, k, v)
                all_ok &= report(f"{tag} o vs xla fp32", rel(got[0], ref[0]), 2e-2)
                all_ok &= report(f"{tag} final vs xla fp32", rel(got[1], ref[1]), 2e-2)
            else:
                def g(backend, q, k, v, do=do):
                    (o, s), pull = jax.vjp(lambda *a: f(backend, *a), q, k, v)
                    return pull((do.astype(o.dtype), jnp.ones_like(s)))

                ref = jax.jit(lambda q, k, v: g("xla", q, k, v))(*f32)
                got = jax.jit(lambda q, k, v: g("triton", q, k, v))(q, k, v)
                for name, x, y in zip(["dq", "dk", "dv"], got, ref, strict=True):
                    all_ok &= report(f"{tag} {name} vs xla fp32", rel(x, y), 2e-2)
    # 3. flash-linear-attention computes the same function.
    try:
        b, t, h, d = 1, 16384, FLAGS.heads, FLAGS.dim
        q, k, v, do = make_inputs(jax.random.PRNGKey(5), b, t, h, d)
        decay = decays(h)
        ref = jax.jit(lambda q, k, v: lightning_attention(q, k, v, decay, backend="xla"))(
            *[x.astype(jnp.float32) for x in (q, k, v)])
        ours = jax.jit(lambda q, k, v: lightning_attention(q, k, v, decay, backend="triton"))(q, k, v)
        f, _, _ = fla_fns(q, k, v, do, decay)
        o_fla = jnp.from_dlpack(f().detach().contiguous())
        report("fla chunk_simple_gla vs xla fp32 (T=16K)", rel(o_fla, ref), 2e-2)
        report("ours vs xla fp32 (T=16K)", rel(ours, ref), 2e-2)
        all_ok &= report("ours vs fla (T=16K)", rel(ours, o_fla), 2e-2)
    except ImportError as e:
        print("fla not available:", e)
    print("CHECKS", "PASSED" if all_ok else "FAILED", flush=True)
    return lines, all_ok


# ----------------------------------------------------------------------------------------------- bench
def floors(b, t, h, d):
    """(fwd, fwd+bwd) floor in ms from the spec's cost model: max of bytes / BW and FLOPs / MM."""
    n = b * t * h
    fwd = max(n * 4 * d * 2 / BW, n * (4 * 64 * d + 4 * d * d) / MM)
    fb = max(n * 11 * d * 2 / BW, 3 * n * (4 * 64 * d + 4 * d * d) / MM)
    return fwd * 1e3, fb * 1e3


def bench():
    h, d = FLAGS.heads, FLAGS.dim
    sizes = [(1, int(s)) for s in FLAGS.seqs]
    if FLAGS.batch_4k:
        sizes.insert(1, (FLAGS.batch_4k, 4096))
    decay = decays(h)
    rows = []
    for b, t in sizes:
        q, k, v, do = make_inputs(jax.random.PRNGKey(t + b), b, t, h, d)
        r = {"b": b, "t": t}
        for impl in sorted(FLAGS.impls, key=lambda x: x != "fla"):  # fla first, then free torch's cache
            try:
                if impl in ("triton", "xla"):
                    f, fb = lightning_fns(impl, decay)
                    r[impl] = (time_jax(f, q, k, v), time_jax(fb, q, k, v, do))
                elif impl == "cudnn":
                    if t > FLAGS.max_cudnn_seq:
                        continue
                    f, fb = cudnn_fns()
                    r[impl] = (time_jax(f, q, k, v), time_jax(fb, q, k, v, do))
                elif impl == "fla":
                    f, fb, leaves = fla_fns(q, k, v, do, decay)
                    r[impl] = (time_torch(f), time_torch(fb))
                    del f, fb, leaves
                    import torch

                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{impl} b={b} t={t} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(b, t, {k_: v_ for k_, v_ in r.items() if k_ not in ("b", "t")}, flush=True)
        rows.append(r)
    return rows


def table(rows):
    h, d = FLAGS.heads, FLAGS.dim

    def cell(r, impl, i):
        return f"{r[impl][i]:.3f}" if impl in r else "-"

    def ratio(r, impl, i):
        return f"{r[impl][i] / r['triton'][i]:.2f}x" if impl in r and "triton" in r else "-"

    out = ["| batch | seq | pass | ours (triton) ms | xla ms | fla ms | cuDNN softmax ms | vs fla | vs xla | "
           "ours Mtok/s | ours % of floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = floors(r["b"], r["t"], h, d)
        for i, name in enumerate(["fwd", "fwd+bwd"]):
            tok = f"{r['b'] * r['t'] / r['triton'][i] / 1e3:.1f}" if "triton" in r else "-"
            pct = f"{100 * fl[i] / r['triton'][i]:.0f}%" if "triton" in r else "-"
            out.append(f"| {r['b']} | {r['t']} | {name} | {cell(r, 'triton', i)} | {cell(r, 'xla', i)} | "
                       f"{cell(r, 'fla', i)} | {cell(r, 'cudnn', i)} | {ratio(r, 'fla', i)} | {ratio(r, 'xla', i)} | "
                       f"{tok} | {pct} |")
    return "\n".join(out)


def tune():
    """Times launch-knob variants (applied to forward and backward alike) and keeps the best of each pass."""
    h, d, t = FLAGS.heads, FLAGS.dim, FLAGS.tune_seq
    q, k, v, do = make_inputs(jax.random.PRNGKey(1), FLAGS.tune_batch, t, h, d)
    decay = decays(h)
    best = {"fwd": (float("inf"), None, None), "bwd": (float("inf"), None, None)}  # ms, knobs, block
    grid = (FLAGS.tune_blocks, FLAGS.tune_tiles, FLAGS.tune_warps, FLAGS.tune_stages, FLAGS.tune_programs)
    for block, tile, warps, stages, progs in itertools.product(*([int(v) for v in values] for values in grid)):
        knobs = {"target_programs": progs, "min_chunk_blocks": 4, "max_tile": tile, "num_warps": warps,
                 "num_stages": stages}
        tb.TUNING.update(fwd=dict(knobs), bwd=dict(knobs))
        ops._lightning.clear_cache()
        try:
            f, fb = lightning_fns("triton", decay, block_size=block)
            fwd, both = time_jax(f, q, k, v), time_jax(fb, q, k, v, do)
        except Exception as e:  # noqa: BLE001
            print(f"tune block {block} {knobs} failed: {str(e)[:150]}", flush=True)
            continue
        print(f"tune block {block} {knobs}: fwd {fwd:.3f} fwd+bwd {both:.3f} ms", flush=True)
        for name, val in (("fwd", fwd), ("bwd", both - fwd)):
            if val < best[name][0]:
                best[name] = (val, knobs, block)
    tb.TUNING.update(fwd=best["fwd"][1], bwd=best["bwd"][1])
    ops._lightning.clear_cache()
    blocks = {name: best[name][2] for name in best}  # reported only: the op's block stays DEFAULT_BLOCK_SIZE
    print("TUNED", tb.TUNING, "blocks", blocks, flush=True)
    return [f"Tuned at batch {FLAGS.tune_batch}, seq {t}: {tb.TUNING}, best with blocks {blocks}"]


def main(argv):
    del argv
    dev = jax.devices()[0]
    print("device:", dev.device_kind, "jax", jax.__version__, flush=True)
    md = [f"Device: {dev.device_kind}; jax {jax.__version__}; date {datetime.date.today()}; heads {FLAGS.heads}, "
          f"head_dim {FLAGS.dim}, bf16; median ms.", ""]
    if FLAGS.tune:
        md += tune() + [""]
    if FLAGS.check:
        lines, _ = check()
        md += ["Checks (relative error norms):", "", *[f"- {x}" for x in lines], ""]
    if FLAGS.bench:
        md.append(table(bench()))
    text = "\n".join(md)
    report(text, FLAGS.out_md)


if __name__ == "__main__":
    app.run(main)
