"""Loading the trainer's orbax params (layout of ``minimax_jax/train/checkpointing.py``) for inference."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from minimax_jax.config import tiny
from minimax_jax.infer.loading import load_model
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.train.checkpointing import stringify_keys


def test_orbax_params_round_trip_from_a_workdir(tmp_path):
    config = tiny()
    trained = MiniMaxForCausalLM(config, rngs=nnx.Rngs(7))
    params = nnx.to_pure_dict(nnx.state(trained, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "checkpoints" / "12" / "params", stringify_keys(params))
    (tmp_path / "checkpoints" / "3").mkdir()  # an older, empty step folder is ignored

    model, source = load_model(tmp_path, orbax_config=config)
    assert source.endswith("checkpoints/12/params")
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)
    with pytest.raises(ValueError, match="stores no model config"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face folder"):
        load_model(tmp_path / "missing")
