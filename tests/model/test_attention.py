"""GQA causal softmax attention against numpy with explicit kv-head repetition."""

import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.model.attention import causal_gqa_attention, segment_index
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
