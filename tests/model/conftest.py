"""Shared fixtures: a tiny random checkpoint on disk and the model loaded from it (no JAX random init needed)."""

import pytest

from minimax_jax import from_pretrained
from minimax_jax.config import tiny
from tests.model import numpy_reference as ref


@pytest.fixture(scope="session")
def tiny_config():
    return tiny()


@pytest.fixture(scope="session")
def tiny_tensors(tiny_config):
    return ref.random_official_tensors(tiny_config, seed=0, std=0.1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config, tiny_tensors):
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    ref.write_checkpoint(folder, tiny_config, tiny_tensors)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return from_pretrained(tiny_checkpoint)
