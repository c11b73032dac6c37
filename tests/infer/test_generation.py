"""Cached prefill + decode on the tiny golden model (fp32): equal to the full forward, to transformers' greedy
``generate``, batched equal to one by one, and independent of the prefill chunk and key block sizes; the trainer's
closing sample is that greedy generation.

Every Generator here preallocates the same capacity so that the compiled programs are shared between tests (except
the trainer's, which sizes its own).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax import from_pretrained
from minimax_jax.infer import Generator, PromptTooLongError
from minimax_jax.train.trainer import sample_text

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "hf_full_rope"
RTOL = 1e-5  # fp32: max |difference| relative to max |logit|
NEW = 8
CAPACITY = 48  # 37 prompt tokens + 8 new tokens, rounded up to the key block


@pytest.fixture(scope="module")
def golden():
    assert (GOLDEN / "generate_ids.npy").exists(), f"golden data missing in {GOLDEN} (tests/golden/README.md)"
    with jax.default_matmul_precision("highest"):
        model = from_pretrained(GOLDEN, dtype=jnp.float32)
    prompts = np.load(GOLDEN / "input_ids.npy")
    generated = np.load(GOLDEN / "generate_ids.npy")
    full = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(generated)))  # logits of prompt + 8
    return model, prompts, generated, full


def _generator(model, chunk=16, kv_block=8):
    return Generator(model, max_length=CAPACITY, prefill_chunk=chunk, kv_block=kv_block, fixed_capacity=True)


def _relative_error(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def test_prefill_and_decode_logits_equal_full_forward(golden):
    model, prompts, generated, full = golden
    gen = _generator(model)
    cache, logits = gen.prefill(prompts.tolist(), extra_slots=NEW, all_logits=True)
    err = _relative_error(logits, full[:, :prompts.shape[1]])
    decode_errs = []
    for t in range(prompts.shape[1], generated.shape[1] - 1):  # teacher-forced: feed transformers' tokens
        _, step_logits, cache = gen.decode(cache, jnp.asarray(generated[:, t]))
        decode_errs.append(_relative_error(step_logits, full[:, t]))
    print(f"prefill max relative error {err:.2e}; decode {max(decode_errs):.2e}")
    assert err <= RTOL and max(decode_errs) <= RTOL
    np.testing.assert_array_equal(np.asarray(cache.lengths), [generated.shape[1] - 1] * 2)


def test_greedy_tokens_equal_transformers_generate(golden):
    model, prompts, generated, _ = golden
    result = _generator(model).generate(prompts.tolist(), max_new_tokens=NEW)
    np.testing.assert_array_equal(result.tokens, generated[:, prompts.shape[1]:])
    np.testing.assert_array_equal(result.lengths, [NEW, NEW])


def test_stop_tokens_and_per_row_limits(golden):
    model, prompts, generated, _ = golden
    want = generated[:, prompts.shape[1]:]
    stop = int(want[0, 3])  # row 0 stops at its 4th token (the stop token is kept)
    streamed = []
    result = _generator(model).generate(prompts.tolist(), max_new_tokens=[NEW, 5], stop_tokens=[stop],
                                        on_tokens=lambda step, tokens, emitted: streamed.append((tokens, emitted)))
    first_stop_row1 = np.flatnonzero(want[1] == stop)
    len1 = min(5, first_stop_row1[0] + 1) if first_stop_row1.size else 5
    np.testing.assert_array_equal(result.lengths, [4, len1])
    assert result.row(0) == want[0, :4].tolist() and result.row(1) == want[1, :len1].tolist()
    assert (result.tokens[0, 4:] == 0).all()
    assert len(streamed) == max(4, len1)  # the loop ends once every row stopped
    np.testing.assert_array_equal(np.stack([t for t, _ in streamed], 1)[0, :4], want[0, :4])
    assert [bool(e[0]) for _, e in streamed] == [True] * 4 + [False] * (len(streamed) - 4)


def test_batched_generation_equals_one_by_one(golden):
    model, prompts, _, _ = golden
    rows = [prompts[0].tolist(), prompts[1, :21].tolist()]  # different lengths: row 1 is left-padded by 16
    gen = _generator(model)
    batched = gen.generate(rows, max_new_tokens=NEW)
    for b, row in enumerate(rows):
        alone = gen.generate([row], max_new_tokens=NEW)
        np.testing.assert_array_equal(batched.tokens[b], alone.tokens[0])
    # and the logits: the padded row's prefill logits equal its prefill alone
    _, padded = gen.prefill(rows, extra_slots=NEW, all_logits=True)
    _, alone = gen.prefill([rows[1]], extra_slots=NEW, all_logits=True)
    err = _relative_error(np.asarray(padded)[1, 16:], np.asarray(alone)[0])
    print(f"left-padded row vs alone: max relative logit error {err:.2e}")
    assert err <= RTOL


@pytest.mark.parametrize(("chunk", "kv_block"), [(8, 16), (64, CAPACITY)])
def test_chunk_and_key_block_sizes_do_not_change_logits(golden, chunk, kv_block):
    model, prompts, _, full = golden
    _, logits = _generator(model, chunk=chunk, kv_block=kv_block).prefill(prompts.tolist(), extra_slots=NEW,
                                                                          all_logits=True)
    err = _relative_error(logits, full[:, :prompts.shape[1]])
    print(f"chunk {chunk}, kv_block {kv_block}: max relative error {err:.2e}")
    assert err <= RTOL


def test_prompt_longer_than_maximum_is_a_clear_error(golden):
    model, prompts, _, _ = golden
    with pytest.raises(PromptTooLongError, match="exceeds the configured maximum length 48"):
        _generator(model).generate([prompts[0].tolist() * 2], max_new_tokens=1)


class _IdTokenizer:
    """Text is the ids written out, so that a sample can be compared token by token."""

    def __init__(self, ids):
        self.ids = ids

    def encode(self, text):
        return np.asarray(self.ids, np.int32)

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def test_trainer_sample_is_the_cached_greedy_generation(golden):
    model, prompts, generated, _ = golden
    graphdef, params = nnx.split(model)
    text = sample_text(graphdef, nnx.to_pure_dict(params), _IdTokenizer(prompts[0]), "unused", NEW)
    assert text == " ".join(str(int(i)) for i in generated[0, prompts.shape[1]:])
