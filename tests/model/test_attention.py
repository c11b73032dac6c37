"""GQA causal softmax attention against numpy with explicit kv-head repetition; tokamax's flash path against XLA."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.model import attention
from minimax_jax.model.attention import causal_gqa_attention, segment_index, tokamax_gqa_attention
from tests.model import numpy_reference as ref


def _qkv(seed, batch=2, seq=11, heads=4, kv_heads=2, d=16):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, seq, heads, d)).astype(np.float32),
            rng.standard_normal((batch, seq, kv_heads, d)).astype(np.float32),
            rng.standard_normal((batch, seq, kv_heads, d)).astype(np.float32))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_causal_attention_matches_numpy(kv_heads):
    q, k, v = _qkv(0, kv_heads=kv_heads)
    out = np.asarray(causal_gqa_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    for b in range(q.shape[0]):
        expected = ref.softmax_attention(q[b], k[b], v[b], np.zeros(q.shape[1], np.int32))
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-5)


def test_segment_ids_keep_attention_within_contiguous_segments():
    q, k, v = _qkv(1)
    segments = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 5, 5, 5]], np.int32)
    out = np.asarray(causal_gqa_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                          segment_ids=jnp.asarray(segments)))
    for b in range(2):
        np.testing.assert_allclose(out[b], ref.softmax_attention(q[b], k[b], v[b], segments[b]), rtol=1e-5,
                                   atol=1e-5)
    # The first token of a segment sees only itself: its output is its own value vector (kv head h // 2).
    np.testing.assert_allclose(out[0, 3], np.repeat(v[0, 3], 2, axis=0), rtol=1e-6)
    # Row 1: the third run (id 5 again) does not see the first run of id 5.
    np.testing.assert_allclose(out[1, 8], np.repeat(v[1, 8], 2, axis=0), rtol=1e-6)


def test_segment_index_counts_runs():
    ids = jnp.asarray([[3, 3, 1, 1, 3], [0, 0, 0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(segment_index(ids)), [[0, 0, 1, 1, 2], [0, 0, 0, 0, 0]])


# --- tokamax flash path (its XLA reference kernel on CPU; the GPU kernels in the GPU-only test) --------------------


def _packed_segments(seq):
    """Row 0: runs crossing 64-token blocks, a one-token run, ids that come back (0 .. 1 .. 0 .. 0 after 2);
    row 1: one segment."""
    row = np.zeros(seq, np.int32)
    row[seq // 4: seq // 2 + 5] = 1
    row[seq // 2 + 5: seq // 2 + 6] = 2  # a one-token segment: it sees only itself
    row[seq - 9:] = 1
    return np.stack([row, np.full(seq, 7, np.int32)])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss_and_grads(implementation, kernels, q, k, v, segment_ids):
    """Output and d(sum(o * w))/d(q, k, v) with a fixed non-uniform weight w (fp32 loss)."""
    def loss(q_, k_, v_):
        if kernels:
            o = tokamax_gqa_attention(q_, k_, v_, segment_ids=segment_ids, kernels=kernels)
        else:
            o = causal_gqa_attention(q_, k_, v_, segment_ids=segment_ids, implementation=implementation)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        return jnp.sum(o.astype(jnp.float32) * w), o

    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


def _assert_close(actual, expected, rel, name=""):
    """Elementwise within ``rel`` relative plus ``rel`` times the largest magnitude (bf16 rounding is absolute)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max(), err_msg=name)


def _check_tokamax_against_xla(kernels, dtype, seq, kv_heads, head_dim, packed):
    q, k, v = (jnp.asarray(x, dtype) for x in _qkv(2, seq=seq, kv_heads=kv_heads, d=head_dim))
    segments = jnp.asarray(_packed_segments(seq)) if packed else None
    # fp32 means fp32 matmuls: GPUs would otherwise run both paths' fp32 dots in TF32
    with jax.default_matmul_precision("highest") if dtype == jnp.float32 else contextlib.nullcontext():
        o_xla, g_xla = _loss_and_grads("xla", None, q, k, v, segments)
        o_tk, g_tk = _loss_and_grads("tokamax", kernels, q, k, v, segments)
    assert o_tk.dtype == dtype and all(g.dtype == dtype for g in g_tk)
    rel = 1e-5 if dtype == jnp.float32 else 1e-2
    for name, actual, expected in zip(("o", "dq", "dk", "dv"), (o_tk, *g_tk), (o_xla, *g_xla), strict=True):
        _assert_close(actual, expected, rel, name)
    if packed:  # the one-token segment's output is its own value vector (kv head h // group)
        t = seq // 2 + 5
        expected = np.repeat(np.asarray(v[0, t], np.float32), 4 // kv_heads, axis=0)
        _assert_close(np.asarray(o_tk[0, t], np.float32), expected, rel)


@pytest.mark.parametrize("dtype, seq, kv_heads, head_dim, packed", [
    (jnp.float32, 128, 2, 64, True),
    (jnp.float32, 80, 1, 32, False),
    (jnp.bfloat16, 64, 2, 32, True),
])
def test_tokamax_matches_xla_outputs_and_grads(dtype, seq, kv_heads, head_dim, packed):
    """tokamax's reference kernel: checks the segment -> k_start mapping at fp32 precision on any device."""
    _check_tokamax_against_xla(("xla",), dtype, seq, kv_heads, head_dim, packed)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="tokamax's Mosaic-GPU and Triton kernels need a GPU")
@pytest.mark.parametrize("kernel", ["mosaic_gpu", "triton"])
@pytest.mark.parametrize("seq, packed", [(1024, True), (1000, True), (256, False)])
def test_tokamax_gpu_kernels_match_xla(kernel, seq, packed):
    _check_tokamax_against_xla((kernel,), jnp.bfloat16, seq, 2, 128, packed)


def test_segment_starts():
    ids = jnp.asarray([[3, 3, 1, 1, 3, 3], [0, 0, 0, 0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(attention.segment_starts(ids)), [[0, 0, 2, 2, 4, 4], [0] * 6])


def test_default_implementation(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert attention.default_implementation(jnp.bfloat16, has_segments=True) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.default_implementation(jnp.bfloat16, has_segments=True) == "tokamax"
    assert attention.default_implementation(jnp.float16, has_segments=True) == "tokamax"
    assert attention.default_implementation(jnp.bfloat16, has_segments=False) == "cudnn"
    assert attention.default_implementation(jnp.float32, has_segments=True) == "xla"


def test_unknown_implementation_or_kernel_is_an_error():
    q, k, v = (jnp.asarray(x) for x in _qkv(0))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        causal_gqa_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="tokamax attention kernels must be among"):
        tokamax_gqa_attention(q, k, v, kernels=("cuda",))


def test_tokamax_forward_is_not_recomputed_under_remat():
    """Under ``jax.checkpoint`` the backward pass reuses the forward's output and softmax statistics: the gradient
    has as many matmuls as without remat (tokamax's own custom_vjp would rerun the forward's two)."""
    q, k, v = (jnp.asarray(x) for x in _qkv(0))
    segments = jnp.asarray(_packed_segments(q.shape[1]))

    def loss(q_, k_, v_):
        return jnp.sum(jnp.sin(tokamax_gqa_attention(q_, k_, v_, segment_ids=segments, kernels=("xla",))))

    def matmuls(fn):
        return str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, k, v)).count("dot_general")

    rematted = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)
    assert matmuls(rematted) == matmuls(loss) > 0
