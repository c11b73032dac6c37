"""Sampling filters and the sampler (pure functions, no model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.infer.generator import chunk_sizes, left_pad, stopped_lengths
from minimax_jax.infer.sampling import SamplingConfig, filter_logits, sample_tokens

LOGITS = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15], [0.1, 0.2, 0.3, 0.4]], jnp.float32))


def test_top_k_keeps_the_k_largest():
    kept = np.isfinite(np.asarray(filter_logits(LOGITS, top_k=2, top_p=1.0)))
    np.testing.assert_array_equal(kept, [[True, False, True, False], [False, False, True, True]])


def test_top_p_keeps_the_smallest_nucleus():
    # row 0: 0.5 < 0.65 <= 0.5 + 0.3 -> {0, 2}; row 1: 0.4 < 0.65 <= 0.4 + 0.3 -> {3, 2}
    kept = np.isfinite(np.asarray(filter_logits(LOGITS, top_k=0, top_p=0.65)))
    np.testing.assert_array_equal(kept, [[True, False, True, False], [False, False, True, True]])
    top1 = np.isfinite(np.asarray(filter_logits(LOGITS, top_k=0, top_p=0.01)))
    np.testing.assert_array_equal(top1.sum(axis=1), [1, 1])


def test_greedy_is_argmax_and_sampling_follows_the_filters_and_seed():
    np.testing.assert_array_equal(sample_tokens(LOGITS, jax.random.key(0), SamplingConfig()), [0, 3])
    config = SamplingConfig(temperature=1.0, top_k=2, seed=3)
    keys = jax.random.split(jax.random.key(config.seed), 400)
    draws = np.asarray(jax.vmap(lambda k: sample_tokens(LOGITS, k, config))(keys))
    assert set(np.unique(draws[:, 0])) == {0, 2} and set(np.unique(draws[:, 1])) == {2, 3}
    assert abs((draws[:, 0] == 0).mean() - 0.5 / 0.8) < 0.08  # renormalized over the kept tokens
    again = np.asarray(jax.vmap(lambda k: sample_tokens(LOGITS, k, config))(keys))
    np.testing.assert_array_equal(draws, again)


def test_invalid_sampling_configs_are_rejected():
    for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_padding_chunks_and_stop_lengths():
    ids, starts = left_pad([[1, 2, 3], [4]])
    np.testing.assert_array_equal(ids, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(starts, [0, 2])
    assert chunk_sizes(37, 16) == [5, 16, 16] and chunk_sizes(32, 16) == [16, 16]
    tokens = np.asarray([[5, 9, 9, 9], [9, 5, 5, 5], [5, 5, 5, 5]])
    np.testing.assert_array_equal(stopped_lengths(tokens, np.asarray([4, 4, 3]), [9]), [2, 1, 3])
