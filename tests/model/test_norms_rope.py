"""RMSNorm and partial RoPE against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.model.norms_rope import apply_partial_rope, rms_norm, rope_inverse_frequencies
from tests.model import numpy_reference as ref


def test_rms_norm_matches_numpy():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    out = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5)
    np.testing.assert_allclose(np.asarray(out), ref.rms_norm(x.astype(np.float64), w, 1e-5), rtol=2e-6, atol=1e-6)


def test_rms_norm_over_two_trailing_axes_is_one_norm_over_all_features():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 4, 3, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    out = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6)).reshape(2, 4, 24)
    expected = ref.rms_norm(x.reshape(2, 4, 24).astype(np.float64), w.reshape(24), 1e-6)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-6)


def test_rms_norm_statistics_in_fp32_for_bf16_input():
    # 300^2 * 64 overflows nothing in fp32 but squares lose all precision in bf16 accumulation.
    x = jnp.full((1, 64), 300.0, jnp.bfloat16)
    out = rms_norm(x, jnp.ones(64, jnp.float32), 1e-5)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0, rtol=1e-2)


def test_inverse_frequencies_follow_the_formula():
    inv = np.asarray(rope_inverse_frequencies(8, 1e4))
    np.testing.assert_allclose(inv, 1e4 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)


@pytest.mark.parametrize("rotary_dim", [4, 8, 16])
def test_partial_rope_matches_numpy_and_leaves_tail_untouched(rotary_dim):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
    positions = np.stack([np.arange(7), np.arange(100, 107)]).astype(np.int32)
    out = np.asarray(apply_partial_rope(jnp.asarray(x), jnp.asarray(positions), rotary_dim=rotary_dim, theta=1e4))
    np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])
    for b in range(2):
        expected = ref.rope(x[b].astype(np.float64), positions[b].astype(np.float64), rotary_dim, 1e4)
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=2e-5)
    assert not np.allclose(out[1, :, :, :rotary_dim], x[1, :, :, :rotary_dim], atol=1e-2)


def test_rope_position_zero_is_identity_and_scores_depend_on_relative_position():
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 8)).astype(np.float32)) for _ in range(2))

    def rotated(x, pos):
        return apply_partial_rope(x, jnp.full((1, 1), pos, jnp.int32), rotary_dim=8, theta=1e4)[0, 0, 0]

    np.testing.assert_array_equal(np.asarray(rotated(q, 0)), np.asarray(q[0, 0, 0]))
    score = lambda m, n: float(jnp.dot(rotated(q, m), rotated(k, n)))  # noqa: E731
    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
