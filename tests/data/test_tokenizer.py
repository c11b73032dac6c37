"""Tokenizers: byte round trip, the Hugging Face wrapper on an in-test tokenizer.json, the BOS/EOS policy."""

import json

import numpy as np
import pytest

from minimax_jax.data.byte_tokenizer import ByteTokenizer
from minimax_jax.data.tokenizer import HFTokenizer, Tokenizer, document_token_ids, load_tokenizer

TEXT = "Grüße, мир! 你好 🙂\nx = 1"


def test_byte_tokenizer_round_trip_non_ascii():
    tokenizer = load_tokenizer("byte")
    assert isinstance(tokenizer, ByteTokenizer) and isinstance(tokenizer, Tokenizer)
    ids = tokenizer.encode(TEXT)
    assert ids.dtype == np.int32 and len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.decode([72, 300, -1]) == "H\ufffd\ufffd"
    np.testing.assert_array_equal(document_token_ids(tokenizer, "ab"), [97, 98])  # no BOS/EOS


def test_byte_tokenizer_has_no_special_tokens():
    with pytest.raises(ValueError, match="no special tokens"):
        load_tokenizer("byte", eos_token="</s>")


def test_hf_tokenizer_wraps_tokenizer_json(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir / "tokenizer.json"))
    assert isinstance(tokenizer, HFTokenizer) and isinstance(tokenizer, Tokenizer)
    assert tokenizer.vocab_size == 3 + len({"the", "cat", "sat", "dog", "on", "mat", "a"})
    ids = tokenizer.encode("the cat sat on the mat")
    assert ids.dtype == np.int32 and len(ids) == 6 and ids[0] == ids[4]
    assert tokenizer.decode(ids) == "the cat sat on the mat"
    assert tokenizer.encode("the zebra")[1] == 0  # unknown word -> <unk>
    assert tokenizer.eos_id is None and tokenizer.bos_id is None  # no tokenizer_config.json, none given


def test_hf_tokenizer_special_tokens(tiny_tokenizer_dir):
    (tiny_tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir), bos_token="<s>")  # a directory works too
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    ids = document_token_ids(tokenizer, "a cat")
    np.testing.assert_array_equal(ids, [1, *tokenizer.encode("a cat"), 2])
    assert load_tokenizer(str(tiny_tokenizer_dir), eos_token="<s>").eos_id == 1  # explicit beats config
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(str(tiny_tokenizer_dir), eos_token="<|endoftext|>")


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
