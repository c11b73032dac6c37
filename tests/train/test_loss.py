"""Chunked cross-entropy equals the plain one (value and gradient); masked tokens do not count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.train.loss import chunked_cross_entropy_sum, cross_entropy_sum, logits_from_hidden


def _inputs(batch=2, seq=12, dim=8, vocab=50, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (batch, seq, dim), jnp.float32)
    lm_head = jax.random.normal(keys[1], (dim, vocab), jnp.float32)
    targets = jax.random.randint(keys[2], (batch, seq), 0, vocab)
    mask = (jax.random.uniform(keys[3], (batch, seq)) > 0.3).astype(jnp.float32)
    return hidden, lm_head, targets, mask


def test_chunked_equals_plain_value_and_gradient():
    hidden, lm_head, targets, mask = _inputs()

    def plain(h, w):
        return cross_entropy_sum(logits_from_hidden(h, w), targets, mask)

    def chunked(h, w):
        return chunked_cross_entropy_sum(h, w, targets, mask, chunk_size=4)

    np.testing.assert_allclose(chunked(hidden, lm_head), plain(hidden, lm_head), rtol=1e-6)
    grads_plain = jax.grad(plain, argnums=(0, 1))(hidden, lm_head)
    grads_chunked = jax.grad(chunked, argnums=(0, 1))(hidden, lm_head)
    for a, b in zip(grads_chunked, grads_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_definition():
    hidden, lm_head, targets, mask = _inputs(batch=1, seq=3)
    logits = np.asarray(logits_from_hidden(hidden, lm_head), np.float64)[0]
    expected = sum(mask[0, t] * (np.log(np.exp(logits[t]).sum()) - logits[t, targets[0, t]]) for t in range(3))
    np.testing.assert_allclose(cross_entropy_sum(logits_from_hidden(hidden, lm_head), targets, mask), expected,
                               rtol=1e-5)


def test_masked_tokens_are_ignored():
    hidden, lm_head, targets, mask = _inputs()
    changed = jnp.where(mask > 0, targets, (targets + 7) % 50)  # change only masked-out targets
    changed_hidden = jnp.where(mask[..., None] > 0, hidden, 100.0)  # and their hidden states
    before = chunked_cross_entropy_sum(hidden, lm_head, targets, mask, chunk_size=6)
    after = chunked_cross_entropy_sum(changed_hidden, lm_head, changed, mask, chunk_size=6)
    assert float(before) == float(after)
    assert not np.array_equal(changed, targets)


def test_chunked_gradient_in_bf16_matches_the_fp32_gradient():
    """The fused backward rounds the logit gradient to bf16 once: within bf16 tolerance of the fp32 gradient."""
    hidden, lm_head, targets, mask = _inputs(batch=2, seq=16, dim=32, vocab=300)

    def chunked(h, w):
        return chunked_cross_entropy_sum(h, w, targets, mask, chunk_size=8) / 7.0  # a cotangent that is not 1

    exact = jax.grad(chunked, argnums=(0, 1))(hidden, lm_head)
    low = jax.grad(chunked, argnums=(0, 1))(hidden.astype(jnp.bfloat16), lm_head)
    assert low[0].dtype == jnp.bfloat16 and low[1].dtype == jnp.float32
    for a, b in zip(low, exact, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2


def test_chunked_loss_needs_a_dividing_chunk():
    hidden, lm_head, targets, mask = _inputs()
    with pytest.raises(ValueError, match="chunk_size 5 must divide"):
        chunked_cross_entropy_sum(hidden, lm_head, targets, mask, chunk_size=5)
    with pytest.raises(ValueError, match="chunk_size 5 must divide"):
        jax.grad(chunked_cross_entropy_sum)(hidden, lm_head, targets, mask, 5)
