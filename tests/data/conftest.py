"""Shared fixtures for the data tests."""

import pytest


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
    """A WordLevel tokenizer trained here on a few strings (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["the cat sat", "the dog sat on the mat", "a cat"], trainer=trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path
