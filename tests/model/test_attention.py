"""GQA causal softmax attention against numpy with explicit kv-head repetition; the Pallas flash path against XLA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from minimax_jax.model import attention
from minimax_jax.model.attention import causal_gqa_attention, flash_gqa_attention, pallas_fits, segment_index
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


# --- Pallas-Triton flash path (interpret mode on CPU) -------------------------------------------------------------


def _packed_segments(seq):
    """Row 0: runs crossing the 64-token tiles, a one-token run, ids that come back (0 .. 1 .. 0 .. 0 after 2);
    row 1: one segment."""
    row = np.zeros(seq, np.int32)
    row[seq // 4: seq // 2 + 5] = 1
    row[seq // 2 + 5: seq // 2 + 6] = 2  # a one-token segment: it sees only itself
    row[seq - 9:] = 1
    return np.stack([row, np.full(seq, 7, np.int32)])


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(implementation, q, k, v, segment_ids):
    """Output and d(sum(o * w))/d(q, k, v) with a fixed non-uniform weight w (fp32 loss)."""
    def loss(q_, k_, v_):
        o = causal_gqa_attention(q_, k_, v_, segment_ids=segment_ids, implementation=implementation)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        return jnp.sum(o.astype(jnp.float32) * w), o

    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


def _assert_close(actual, expected, rel, name=""):
    """Elementwise within ``rel`` relative plus ``rel`` times the largest magnitude (bf16 rounding is absolute)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max(), err_msg=name)


@pytest.mark.parametrize("dtype, seq, kv_heads, head_dim, packed", [
    (jnp.float32, 128, 2, 64, True),
    (jnp.float32, 64, 1, 32, False),
    (jnp.bfloat16, 64, 2, 32, True),
])
def test_pallas_matches_xla_outputs_and_grads(dtype, seq, kv_heads, head_dim, packed):
    q, k, v = (jnp.asarray(x, dtype) for x in _qkv(2, seq=seq, kv_heads=kv_heads, d=head_dim))
    segments = jnp.asarray(_packed_segments(seq)) if packed else None
    o_xla, g_xla = _loss_and_grads("xla", q, k, v, segments)
    o_pal, g_pal = _loss_and_grads("pallas", q, k, v, segments)
    assert o_pal.dtype == dtype and all(g.dtype == dtype for g in g_pal)
    rel = 1e-5 if dtype == jnp.float32 else 1e-2
    for name, actual, expected in zip(("o", "dq", "dk", "dv"), (o_pal, *g_pal), (o_xla, *g_xla), strict=True):
        _assert_close(actual, expected, rel, name)
    if packed:  # the one-token segment's output is its own value vector (kv head h // group)
        t = seq // 2 + 5
        expected = np.repeat(np.asarray(v[0, t], np.float32), 4 // kv_heads, axis=0)
        _assert_close(np.asarray(o_pal[0, t], np.float32), expected, rel)


def test_pallas_falls_back_to_xla_when_seq_does_not_fit_the_blocks():
    seq = 80  # the 128-long forward tile would be clipped to 80, not a power of two
    assert not pallas_fits(seq, 32)
    q, k, v = (jnp.asarray(x) for x in _qkv(3, seq=seq, d=32))
    segments = jnp.asarray(_packed_segments(seq))
    np.testing.assert_array_equal(causal_gqa_attention(q, k, v, segment_ids=segments, implementation="pallas"),
                                  causal_gqa_attention(q, k, v, segment_ids=segments, implementation="xla"))
    with pytest.raises(ValueError, match="do not fit"):
        flash_gqa_attention(q, k, v, segment_ids=segments)


def test_pallas_fits_multiples_of_128():
    assert all(pallas_fits(seq, 128) for seq in (16, 32, 64, 128, 256, 1024, 8192, 128 * 5))
    assert not any(pallas_fits(seq, 128) for seq in (8, 48, 96, 200, 1000, 8191))
    assert not pallas_fits(128, 8)


def test_default_implementation(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert attention.default_implementation(jnp.bfloat16, has_segments=True) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.default_implementation(jnp.bfloat16, has_segments=True) == "pallas"
    assert attention.default_implementation(jnp.float16, has_segments=True) == "pallas"
    assert attention.default_implementation(jnp.bfloat16, has_segments=False) == "cudnn"
    assert attention.default_implementation(jnp.float32, has_segments=True) == "xla"


def test_unknown_implementation_is_an_error():
    q, k, v = (jnp.asarray(x) for x in _qkv(0))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        causal_gqa_attention(q, k, v, implementation="flash")


H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
N_DEVICES = 2


def _export_for_cuda(fn, q, kv, segments):
    """Lowers ``fn`` for CUDA from this (CPU) host, batch-sharded in a shard_map over an abstract H100 mesh."""
    mesh = AbstractMesh((N_DEVICES,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)
    out_specs = jax.tree.map(lambda _: P("data"), jax.eval_shape(fn, q, kv, kv, segments))
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=out_specs, check_vma=False)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(sharded), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
        )(q, kv, kv, segments)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def _export_args(seq=8192):
    """The ``small`` preset's attention shapes: 8 q heads (2 kv heads here, to exercise the repeat) x 128, bf16."""
    q = jax.ShapeDtypeStruct((2 * N_DEVICES, seq, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2 * N_DEVICES, seq, 2, 128), jnp.bfloat16)
    return q, kv, jax.ShapeDtypeStruct((2 * N_DEVICES, seq), jnp.int32)


def test_pallas_forward_lowers_for_cuda():
    def fwd(q, k, v, segments):
        return flash_gqa_attention(q, k, v, segment_ids=segments, interpret=False)

    text = _export_for_cuda(fwd, *_export_args())
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 1
    assert "tensor<2x8192x8x128xbf16>" in text  # the kernel sees the per-device batch and the repeated kv heads


def test_pallas_backward_lowers_for_cuda():
    def grads(q, k, v, segments):
        def loss(q_, k_, v_):
            o = flash_gqa_attention(q_, k_, v_, segment_ids=segments, interpret=False)
            return jnp.sum(o.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = _export_for_cuda(grads, *_export_args())
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 3  # forward (lse), backward preprocess, dq/dk/dv
