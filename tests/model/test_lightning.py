"""Lightning mixer: ALiBi slopes, decay per (head, layer), and the mixer against a numpy recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.model.lightning import (
    alibi_slopes,
    lightning_decay_rates,
    lightning_mixer,
    lightning_projections,
    split_last_axis,
)
from tests.model import numpy_reference as ref


@pytest.mark.parametrize(("head", "layer"), [(0, 0), (0, 79), (10, 40), (31, 7), (63, 0), (63, 79)])
def test_decay_rates_for_the_released_shape(head, layer):
    rates = np.asarray(lightning_decay_rates(64, jnp.int32(layer), 80))
    assert rates.dtype == np.float32 and rates.shape == (64,)
    expected = 2.0 ** (-8 * (head + 1) / 64) * (1 - layer / 79 + 1e-5)
    assert rates[head] == pytest.approx(expected, rel=1e-6)


def test_decay_rate_accepts_a_traced_layer_index():
    rates = jax.jit(lambda layer: lightning_decay_rates(8, layer, 80))(jnp.int32(40))
    np.testing.assert_allclose(np.asarray(rates), ref.slopes_power_of_two(8) * (1 - 40 / 79 + 1e-5), rtol=1e-6)


def test_non_power_of_two_heads_use_the_alibi_interleaving_fallback():
    # H=6: the 4 slopes of H=4 (2^-2, 2^-4, 2^-6, 2^-8), then even-indexed slopes of H=8 (2^-1, 2^-3).
    np.testing.assert_allclose(alibi_slopes(6), 2.0 ** -np.array([2, 4, 6, 8, 1, 3]), rtol=1e-12)
    # H=12: the 8 slopes of H=8 (2^-1..2^-8), then slopes 0, 2, 4, 6 of H=16 (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5).
    expected = 2.0 ** -np.array([1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(alibi_slopes(12), expected, rtol=1e-12)
    transformers_formula = (2.0 ** (-8 / 6)) ** (np.arange(6) + 1)
    assert not np.allclose(alibi_slopes(6), transformers_formula, rtol=1e-2)


def test_power_of_two_slopes():
    np.testing.assert_allclose(alibi_slopes(64), ref.slopes_power_of_two(64), rtol=1e-12)


def test_mixer_matches_numpy_recurrence_with_segments():
    rng = np.random.default_rng(0)
    batch, seq, hidden, heads, d = 2, 37, 24, 3, 16  # 37 = two blocks of 16 plus a tail (the GPU kernels' minimum)
    x = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    qkv = (0.3 * rng.standard_normal((3 * heads * d, hidden))).astype(np.float32)  # official layout
    gate = (0.3 * rng.standard_normal((heads * d, hidden))).astype(np.float32)
    norm = (1 + 0.1 * rng.standard_normal(heads * d)).astype(np.float32)
    out_proj = (0.3 * rng.standard_normal((hidden, heads * d))).astype(np.float32)
    decay = np.array([0.5, 0.05, 0.005], np.float32)
    segments = np.stack([np.zeros(seq), (np.arange(seq) >= 20)]).astype(np.int32)
    with jax.default_matmul_precision("highest"):  # fp32 dots, not TF32, on GPUs
        out = lightning_mixer(
            jnp.asarray(x), qkv_proj=jnp.asarray(qkv.T.reshape(hidden, heads, 3 * d)),
            output_gate=jnp.asarray(gate.T.reshape(hidden, heads, d)), norm=jnp.asarray(norm.reshape(heads, d)),
            out_proj=jnp.asarray(out_proj.T.reshape(heads, d, hidden)), decay=jnp.asarray(decay),
            segment_ids=jnp.asarray(segments), block_size=16)
    for b in range(batch):
        xb = x[b].astype(np.float64)
        q_k_v = ref.silu(xb @ qkv.T).reshape(seq, heads, 3 * d)
        o = ref.lightning_recurrence(q_k_v[..., :d], q_k_v[..., d:2 * d], q_k_v[..., 2 * d:], decay, segments[b])
        o = ref.rms_norm(o.reshape(seq, heads * d), norm, 1e-6) * ref.sigmoid(xb @ gate.T)
        np.testing.assert_allclose(np.asarray(out[b]), o @ out_proj.T, rtol=1e-5, atol=1e-5)


def test_projections_match_separate_matmuls_values_and_gradients():
    """The one-matmul projections against one matmul per output, forward and vjp (fp32, highest precision)."""
    rng = np.random.default_rng(1)
    hidden, heads, d = 24, 3, 8
    x = jnp.asarray(rng.standard_normal((2, 5, hidden)), jnp.float32)
    qkv = jnp.asarray(0.3 * rng.standard_normal((hidden, heads, 3 * d)), jnp.float32)
    gate = jnp.asarray(0.3 * rng.standard_normal((hidden, heads, d)), jnp.float32)

    def separate(x_, qkv_, gate_):
        q, k, v = (jax.nn.silu(jnp.einsum("btd,dhk->bthk", x_, qkv_[..., i * d:(i + 1) * d])) for i in range(3))
        return q, k, v, jnp.einsum("btd,dhk->bthk", x_, gate_)  # the gate's pre-activation

    cotangents = tuple(jnp.asarray(rng.standard_normal((2, 5, heads, d)), jnp.float32) for _ in range(4))
    with jax.default_matmul_precision("highest"):
        outputs, vjp = jax.vjp(lightning_projections, x, qkv, gate)
        expected_outputs, expected_vjp = jax.vjp(separate, x, qkv, gate)
        grads, expected_grads = vjp(cotangents), expected_vjp(cotangents)
    for actual, expected in zip((*outputs, *grads), (*expected_outputs, *expected_grads), strict=True):
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_split_last_axis_gradient_is_one_concatenate():
    x = jnp.arange(24.0).reshape(2, 12)
    parts = split_last_axis(x, 3)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(parts, axis=-1)), np.asarray(x))
    _, vjp = jax.vjp(lambda x_: split_last_axis(x_, 3), x)
    jaxpr = str(jax.make_jaxpr(vjp)(tuple(jnp.full((2, 4), i, jnp.float32) for i in range(3))))
    assert "concatenate" in jaxpr and "pad" not in jaxpr
    (grad,) = vjp(tuple(jnp.full((2, 4), i, jnp.float32) for i in range(3)))
    np.testing.assert_array_equal(np.asarray(grad), np.repeat(np.arange(3.0), 4)[None].repeat(2, 0))
