"""The document-bounded attention backward: its loop bounds and block masks (on CPU, by enumerating blocks), its
jnp reference against autodiff, its lowering for an H100, and the kernels against the reference (GPU only)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from minimax_jax.model.attention import causal_gqa_attention, segment_starts, tokamax_gqa_attention
from pallas_kernels import document_attention as da
from tests.pallas_kernels.test_export import H100


def _segments(seq, rng):
    """Rows: one document; documents cut at random places; cuts on block and tile boundaries with one-token
    documents; a long document then many short ones."""
    rows = [np.zeros(seq, np.int32)]
    cuts = np.sort(rng.choice(np.arange(1, seq), 5, replace=False))
    rows.append(np.searchsorted(cuts, np.arange(seq), side="right").astype(np.int32))
    row = np.zeros(seq, np.int32)
    for cut in (64, 128, 129, 300, 301, 302, 512):
        row[cut:] += 1
    rows.append(row)
    rows.append(np.maximum(0, (np.arange(seq) - seq // 2) // 37 + 1).astype(np.int32))
    return np.stack(rows)


def test_block_bounds_visit_every_visible_pair_and_mask_where_needed():
    seq, block, tile = 1024, da.BLOCK, 2 * da.BLOCK
    k_start = np.asarray(segment_starts(jnp.asarray(_segments(seq, np.random.default_rng(0)))))
    first_key_block, query_block_end = map(np.asarray, da.block_bounds(jnp.asarray(k_start)))
    positions = np.arange(seq)
    for row, starts in enumerate(k_start):
        visible = (positions[None, :] <= positions[:, None]) & (positions[None, :] >= starts[:, None])  # [q, k]
        dq_blocks = np.zeros((seq // block, seq // block), bool)  # [query block, key block] the dq kernel visits
        for t in range(seq // tile):
            dq_blocks[2 * t:2 * t + 2, first_key_block[row, t]:2 * t + 2] = True
        dkv_blocks = np.zeros_like(dq_blocks)
        for t in range(seq // tile):
            dkv_blocks[2 * t:query_block_end[row, t], 2 * t:2 * t + 2] = True
        blocks = visible.reshape(seq // block, block, seq // block, block)
        has_visible = blocks.any(axis=(1, 3))
        for name, visited in (("dq", dq_blocks), ("dkv", dkv_blocks)):
            assert not (has_visible & ~visited).any(), (name, row)
            # every visited block that the kernels leave unmasked is entirely visible
            for qb, kb in zip(*np.nonzero(visited), strict=True):
                needs = bool(da._needs_mask(qb * block, kb * block, starts[qb * block + block - 1]))
                assert needs or blocks[qb, :, kb, :].all(), (name, row, qb, kb)
        causal = np.tril(np.ones_like(dq_blocks)).sum()
        if row == 0:  # one document: the causal blocks, plus the one above the diagonal in each 128-row tile
            assert dq_blocks.sum() == dkv_blocks.sum() == causal + seq // tile
        else:  # several documents: fewer blocks (the tile granularity keeps a few without visible pairs)
            assert has_visible.sum() <= dq_blocks.sum() < causal and dkv_blocks.sum() < causal


def test_document_ends():
    k_start = jnp.asarray([[0, 0, 2, 3, 3, 3], [0] * 6], jnp.int32)
    np.testing.assert_array_equal(np.asarray(da.document_ends(k_start)), [[2, 2, 3, 6, 6, 6], [6] * 6])


def _forward_statistics(q, k, v, k_start, scale):
    """fp32 output and softmax statistics ``row_max, row_sum [B, H, T]`` (tokamax's ``m, l``) of attention within
    documents."""
    group = q.shape[2] // k.shape[2]
    kr, vr = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
    positions = jnp.arange(q.shape[1])
    visible = (positions[None, :] <= positions[:, None])[None] & (positions[None, None, :] >= k_start[:, :, None])
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * scale
    logits = jnp.where(visible[:, None], logits, -jnp.inf)
    row_max = logits.max(-1)
    row_sum = jnp.exp(logits - row_max[..., None]).sum(-1)
    out = jnp.einsum("bhts,bshd->bthd", jnp.exp(logits - row_max[..., None]) / row_sum[..., None], vr)
    return out, row_max, row_sum


def _problem(seq, heads, kv_heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    segments = jnp.asarray(_segments(seq, rng))
    batch = segments.shape[0]

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    q, k, v = normal(batch, seq, heads, head_dim), normal(batch, seq, kv_heads, head_dim), normal(
        batch, seq, kv_heads, head_dim)
    return q, k, v, normal(batch, seq, heads, head_dim), segments


def test_reference_is_the_gradient_of_segmented_attention():
    q, k, v, d_out, segments = _problem(192, 4, 2, 16, jnp.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])
    k_start = segment_starts(segments)
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(lambda *a: causal_gqa_attention(*a, segment_ids=segments, implementation="xla"), q, k, v)
        want = vjp(d_out)
        out_ref, row_max, row_sum = _forward_statistics(q, k, v, k_start, scale)
        got = da.document_attention_backward_reference(q, k, v, out, d_out, row_max, row_sum, k_start,
                                                       logits_scale=scale)
    np.testing.assert_allclose(np.asarray(out_ref), np.asarray(out), rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


def test_errors_name_the_shapes():
    q, k, v, d_out, segments = _problem(192, 4, 2, 64, jnp.bfloat16)  # 192 is not a multiple of 128
    row_max = row_sum = jnp.ones((q.shape[0], 4, 192), jnp.float32)
    with pytest.raises(ValueError, match=r"q \(4, 192, 4, 64\).*T a multiple of 128"):
        da.document_attention_backward(q, k, v, q, d_out, row_max, row_sum, segment_starts(segments),
                                       logits_scale=0.1)
    q, k, v, d_out, segments = _problem(256, 4, 2, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"row_max \(4, 4, 192\).*\[B, H, T\]"):
        da.document_attention_backward(q, k, v, q, d_out, row_max, row_sum, segment_starts(segments),
                                       logits_scale=0.1)


def _h100_mesh():
    return AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)


def test_kernels_lower_for_an_h100():
    """jax.export for an H100 from this CPU host: two Mosaic GPU kernels (dq; dk and dv)."""
    s = jax.ShapeDtypeStruct
    b, t, h, hk, d = 2, 1024, 8, 2, 128
    args = (s((b, t, h, d), jnp.bfloat16), s((b, t, hk, d), jnp.bfloat16), s((b, t, hk, d), jnp.bfloat16),
            s((b, t, h, d), jnp.bfloat16), s((b, t, h, d), jnp.bfloat16), s((b, h, t), jnp.float32),
            s((b, h, t), jnp.float32), s((b, t), jnp.int32))
    with jax.sharding.use_abstract_mesh(_h100_mesh()):
        text = jax.export.export(jax.jit(lambda *a: da.document_attention_backward(*a, logits_scale=0.1)),
                                 platforms=["cuda"])(*args).mlir_module()
    assert text.count("mosaic_gpu_v2") == 2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU kernels (no interpret mode for wgmma here)")
@pytest.mark.parametrize("seq, heads, kv_heads, head_dim", [(1024, 8, 2, 128), (512, 4, 4, 64)])
def test_kernels_match_the_reference(seq, heads, kv_heads, head_dim):
    q, k, v, d_out, segments = _problem(seq, heads, kv_heads, head_dim, jnp.bfloat16)
    scale = 1.0 / math.sqrt(head_dim)
    k_start = segment_starts(segments)
    out, row_max, row_sum = _forward_statistics(q, k, v, k_start, scale)
    out = out.astype(jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        want = da.document_attention_backward_reference(q, k, v, out, d_out, row_max, row_sum, k_start,
                                                        logits_scale=scale)
    got = da.document_attention_backward(q, k, v, out, d_out, row_max, row_sum, k_start, logits_scale=scale)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        g, w = np.asarray(g, np.float32), np.asarray(w)
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2 * np.abs(w).max(), err_msg=name)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="tokamax's Mosaic GPU forward needs a GPU")
def test_model_attention_gradient_runs_the_kernels_on_hopper(monkeypatch):
    """With segments, the gradient of the model's tokamax attention calls these kernels on an H100 or H200 (a
    sequence that is not a multiple of 128 goes to tokamax's backward), and matches the XLA path."""
    calls = []
    real = da.document_attention_backward
    monkeypatch.setattr(da, "document_attention_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for seq, expected_calls in ((1024, 1), (1000, 1)):
        q, k, v, d_out, segments = _problem(seq, 8, 2, 128, jnp.bfloat16)

        def grads(fn, inputs=(q, k, v), d_out=d_out):
            return jax.jit(lambda *a: jax.vjp(fn, *a)[1](d_out))(*inputs)

        got = grads(lambda *a, s=segments: tokamax_gqa_attention(*a, segment_ids=s, kernels=("mosaic_gpu",)))
        want = grads(lambda *a, s=segments: causal_gqa_attention(*a, segment_ids=s, implementation="xla"))
        assert len(calls) == expected_calls, seq
        for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2 * np.abs(w).max(), err_msg=f"{name} {seq}")
