"""Lightning attention: every backend equals the lax.scan reference; the reference equals the defining sum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import BACKENDS, lightning_attention, ops
from pallas_kernels.lightning import triton_backend as tb
from pallas_kernels.lightning.ops import resolve_backend
from pallas_kernels.lightning.reference import lightning_attention_reference

# (backend, block_size, interpret); triton runs in interpret mode off GPUs.
IMPLS = [("xla", 8, False), ("triton", 16, jax.default_backend() != "gpu"), ("xla", None, False)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def one_block_chunks(monkeypatch):
    """Let the Triton backend cut even these short test sequences into one-block chunks, so that every test
    crosses chunk boundaries (the chunk-state combine); ``test_default_chunking`` covers the default knobs."""
    for name in ("fwd", "bwd"):
        monkeypatch.setitem(tb.TUNING, name, dict(tb.TUNING[name], min_chunk_blocks=1))
    ops._lightning.clear_cache()
    yield
    ops._lightning.clear_cache()


def _inputs(seed, b, t, h, d, dtype, n_segments=1, with_init=True, sorted_ids=True):
    """Fresh random inputs; segment ids with ``n_segments`` random starts per row."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)) * 0.5, dtype) for _ in range(3))
    decay = jnp.asarray(rng.uniform(0.005, 0.9, h), jnp.float32)
    seg = None
    if n_segments > 1:
        ids = np.zeros((b, t), np.int32)
        for row in range(b):
            starts = np.sort(rng.choice(np.arange(1, t), n_segments - 1, replace=False))
            for i, st in enumerate(starts):
                ids[row, st:] = i + 1 if sorted_ids else (i + 1) % 2
        seg = jnp.asarray(ids)
    init = jnp.asarray(rng.standard_normal((b, h, d, d)) * 0.3, jnp.float32) if with_init else None
    return q, k, v, decay, seg, init


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite values"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _run(fn, q, k, v, init, seed):
    """Output, final state and the vjp for random cotangents of both."""
    if init is None:
        (o, s), pull = jax.vjp(lambda q_, k_, v_: fn(q_, k_, v_, None), q, k, v)
    else:
        (o, s), pull = jax.vjp(fn, q, k, v, init)
    rng = np.random.default_rng(seed + 1000)
    do = jnp.asarray(rng.standard_normal(o.shape), o.dtype)
    ds = jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
    return o, s, pull((do, ds))


@pytest.mark.parametrize("impl", IMPLS[:2], ids=lambda x: f"{x[0]}-C{x[1]}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_init", [True, False], ids=["init", "noinit"])
@pytest.mark.parametrize("n_segments", [1, 3], ids=["1seg", "3seg"])
def test_backend_matches_reference(impl, dtype, with_init, n_segments):
    backend, block, interpret = impl
    seed = hash((backend, block, str(dtype), with_init, n_segments)) % 2**31
    b, t, h, d = 2, 53, 2, 16  # 53: not a multiple of the block
    q, k, v, decay, seg, init = _inputs(seed, b, t, h, d, dtype, n_segments, with_init)

    def ref_fn(q_, k_, v_, s_):
        f32 = jnp.float32
        return lightning_attention(q_.astype(f32), k_.astype(f32), v_.astype(f32), decay, segment_ids=seg,
                                   initial_state=s_, return_final_state=True, backend="reference")

    def fn(q_, k_, v_, s_):
        return lightning_attention(q_, k_, v_, decay, segment_ids=seg, initial_state=s_, return_final_state=True,
                                   backend=backend, block_size=block, interpret=interpret)

    o_ref, s_ref, g_ref = _run(ref_fn, q, k, v, init, seed)
    o, s, g = _run(fn, q, k, v, init, seed)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert s.dtype == jnp.float32 and s.shape == (b, h, d, d)
    tol = TOL[dtype]
    assert _rel(o, o_ref) < tol
    assert _rel(s, s_ref) < tol
    names = ["dq", "dk", "dv", "dinit"]
    for name, x, y in zip(names, g, g_ref, strict=False):
        assert x.shape == y.shape, name
        assert _rel(x, y) < tol, f"{name}: {_rel(x, y)}"


@pytest.mark.parametrize("impl", IMPLS[1:], ids=lambda x: f"{x[0]}-C{x[1]}")
def test_unsorted_segment_ids_and_exact_multiple(impl):
    """Ids that come back (0 1 0) are distinct segments; a length that is an exact multiple needs no tail."""
    backend, block, interpret = impl
    block_used = block or 256
    t = 2 * block_used if backend == "triton" else 40
    q, k, v, decay, seg, init = _inputs(7, 1, t, 2, 16, jnp.float32, n_segments=4, sorted_ids=False)
    o_ref, s_ref = lightning_attention_reference(q, k, v, decay, segment_ids=seg, initial_state=init)
    o, s = lightning_attention(q, k, v, decay, segment_ids=seg, initial_state=init, return_final_state=True,
                               backend=backend, block_size=block, interpret=interpret)
    assert _rel(o, o_ref) < 1e-5 and _rel(s, s_ref) < 1e-5


def test_default_chunking_with_multi_block_chunks(monkeypatch):
    """Default knobs: 9 blocks become chunks of 5 and 4 blocks (a short last chunk), plus a tail."""
    monkeypatch.setattr(tb, "TUNING", {name: dict(knobs, min_chunk_blocks=4) for name, knobs in tb.TUNING.items()})
    ops._lightning.clear_cache()
    assert tb._plan(1, 9 * 16, 2, 16, 16, tb.TUNING["fwd"])[1:] == (5, 2)
    q, k, v, decay, seg, init = _inputs(11, 1, 9 * 16 + 5, 2, 16, jnp.float32, n_segments=3)
    fn = lambda backend, **kw: lambda q_, k_, v_, s_: lightning_attention(  # noqa: E731
        q_, k_, v_, decay, segment_ids=seg, initial_state=s_, return_final_state=True, backend=backend, **kw)
    o_ref, s_ref, g_ref = _run(fn("reference"), q, k, v, init, 11)
    o, s, g = _run(fn("triton", block_size=16, interpret=True), q, k, v, init, 11)
    assert _rel(o, o_ref) < 1e-5 and _rel(s, s_ref) < 1e-5
    for name, x, y in zip(["dq", "dk", "dv", "dinit"], g, g_ref, strict=True):
        assert _rel(x, y) < 1e-5, name


def _defining_sum_f64(q, k, v, decay, seg, init):
    """Direct O(T^2) float64 evaluation of o_t = sum exp(-s(t-tau)) (q_t.k_tau) v_tau (+ initial state)."""
    q, k, v, decay, init = (np.asarray(x, np.float64) for x in (q, k, v, decay, init))
    seg = np.asarray(seg)
    b, t, h, d = q.shape
    o = np.zeros((b, t, h, d))
    final = np.zeros((b, h, d, d))
    for bi in range(b):
        starts = np.concatenate([[0], np.nonzero(seg[bi, 1:] != seg[bi, :-1])[0] + 1])
        seg_start = starts[np.searchsorted(starts, np.arange(t), side="right") - 1]
        for hi in range(h):
            s = decay[hi]
            for ti in range(t):
                for tau in range(seg_start[ti], ti + 1):
                    o[bi, ti, hi] += np.exp(-s * (ti - tau)) * (q[bi, ti, hi] @ k[bi, tau, hi]) * v[bi, tau, hi]
                if seg_start[ti] == 0:
                    o[bi, ti, hi] += np.exp(-s * (ti + 1)) * q[bi, ti, hi] @ init[bi, hi]
            last = seg_start[t - 1]
            for tau in range(last, t):
                final[bi, hi] += np.exp(-s * (t - 1 - tau)) * np.outer(k[bi, tau, hi], v[bi, tau, hi])
            if last == 0:
                final[bi, hi] += np.exp(-s * t) * init[bi, hi]
    return o, final


@pytest.mark.parametrize("n_segments", [1, 3])
def test_reference_equals_defining_sum(n_segments):
    q, k, v, decay, seg, init = _inputs(3 + n_segments, 2, 19, 2, 4, jnp.float32, n_segments=n_segments)
    seg_np = np.zeros((2, 19), np.int32) if seg is None else seg
    o_exp, s_exp = _defining_sum_f64(q, k, v, decay, seg_np, init)
    o, s = lightning_attention_reference(q, k, v, decay, segment_ids=seg, initial_state=init)
    assert _rel(o, o_exp) < 1e-5
    assert _rel(s, s_exp) < 1e-5


@pytest.mark.parametrize("impl", IMPLS[1:], ids=lambda x: f"{x[0]}-C{x[1]}")
def test_chunked_prefill_equals_whole(impl):
    """Split a sequence anywhere, pass final_state as the next chunk's initial_state: same as the whole."""
    backend, block, interpret = impl
    q, k, v, decay, _, init = _inputs(11, 2, 70, 2, 16, jnp.float32)
    kw = dict(backend=backend, block_size=block, interpret=interpret, return_final_state=True)
    o_all, s_all = lightning_attention(q, k, v, decay, initial_state=init, **kw)
    o1, s1 = lightning_attention(q[:, :37], k[:, :37], v[:, :37], decay, initial_state=init, **kw)
    o2, s2 = lightning_attention(q[:, 37:], k[:, 37:], v[:, 37:], decay, initial_state=s1, **kw)
    assert _rel(jnp.concatenate([o1, o2], axis=1), o_all) < 1e-5
    assert _rel(s2, s_all) < 1e-5
    # Decode: one token at a time from the prefill state.
    o3, s3 = lightning_attention(q[:, 69:], k[:, 69:], v[:, 69:], decay, initial_state=lightning_attention(
        q[:, :69], k[:, :69], v[:, :69], decay, initial_state=init, **kw)[1], **kw)
    assert _rel(o3, o_all[:, 69:]) < 1e-5 and _rel(s3, s_all) < 1e-5


def test_auto_backend_is_xla_on_cpu():
    assert resolve_backend("auto") == ("xla" if jax.default_backend() == "cpu" else resolve_backend("auto"))
    q, k, v, decay, _, _ = _inputs(5, 1, 9, 2, 8, jnp.float32, with_init=False)
    o = lightning_attention(q, k, v, decay)
    o_ref, _ = lightning_attention_reference(q, k, v, decay)
    assert _rel(o, o_ref) < 1e-5
    assert set(BACKENDS) == {"auto", "reference", "xla", "triton", "mosaic"}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=jnp.zeros((2, 8, 16))), "q must have rank 4"),
        (dict(k=jnp.zeros((1, 8, 2, 8))), "shapes must match"),
        (dict(v=jnp.zeros((1, 8, 2, 16), jnp.bfloat16)), "dtypes must match"),
        (dict(q=jnp.zeros((1, 8, 2, 16), jnp.int32)), "q must be bf16"),
        (dict(decay=jnp.ones((3,))), "decay must have shape"),
        (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), "segment_ids must have shape"),
        (dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), "segment_ids must be integer"),
        (dict(initial_state=jnp.zeros((1, 2, 16, 8))), "initial_state must have shape"),
        (dict(initial_state=jnp.zeros((1, 2, 16, 16), jnp.bfloat16)), "initial_state must be float32"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(block_size=0), "block_size must be"),
    ],
)
def test_bad_inputs_raise(change, message):
    args = dict(q=jnp.zeros((1, 8, 2, 16)), k=jnp.zeros((1, 8, 2, 16)), v=jnp.zeros((1, 8, 2, 16)),
                decay=jnp.ones((2,)))
    kwargs = {}
    for key, val in change.items():
        (args if key in args else kwargs)[key] = val
    with pytest.raises(ValueError, match=message):
        lightning_attention(args["q"], args["k"], args["v"], args["decay"], **kwargs)
