"""from_pretrained / to_official_tensors: round trips, sharded files, bf16, and errors naming every bad tensor."""

import math
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from minimax_jax import CheckpointError, from_pretrained, to_official_tensors
from minimax_jax.checkpoint import official_tensor_mappings
from minimax_jax.config import tiny
from minimax_jax.model.transformer import MiniMaxForCausalLM
from tests.model import numpy_reference as ref


@pytest.fixture(scope="module")
def config():
    return tiny()


@pytest.fixture(scope="module")
def tensors(config):
    return ref.random_official_tensors(config, seed=3)


def _assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_round_trip_single_file(tmp_path, config, tensors):
    ref.write_checkpoint(tmp_path, config, tensors)
    model = from_pretrained(tmp_path)
    assert isinstance(model, MiniMaxForCausalLM) and model.config == config
    _assert_same_tensors(to_official_tensors(model), tensors)


def test_round_trip_sharded_with_index_and_derived_buffers_ignored(tmp_path, config, tensors):
    with_buffers = dict(tensors)
    for buffer in ("slope_rate", "query_decay", "key_decay", "diagonal_decay"):
        with_buffers[f"model.layers.0.self_attn.{buffer}"] = np.ones((4, 1, 1), np.float32)
    ref.write_checkpoint(tmp_path, config, with_buffers, num_shards=3)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 3
    _assert_same_tensors(to_official_tensors(from_pretrained(tmp_path)), tensors)


def test_bf16_checkpoint_loads_exactly_into_fp32(tmp_path, config, tensors):
    bf16 = {name: a.astype(ml_dtypes.bfloat16) for name, a in tensors.items()}
    ref.write_checkpoint(tmp_path, config, bf16)
    loaded = to_official_tensors(from_pretrained(tmp_path, dtype=jnp.float32))
    _assert_same_tensors(loaded, {name: a.astype(np.float32) for name, a in bf16.items()})


def test_errors_name_every_missing_unexpected_and_misshaped_tensor(tmp_path, config, tensors):
    bad = dict(tensors)
    del bad["model.layers.5.block_sparse_moe.experts.2.w3.weight"]
    del bad["lm_head.weight"]
    bad["model.layers.0.mlp.shared_expert.weight"] = np.zeros((2, 2), np.float32)
    bad["model.layers.3.self_attn.slope_rate"] = np.zeros((4, 1, 1), np.float32)  # softmax layer: not derived
    bad["model.layers.7.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    ref.write_checkpoint(tmp_path, config, bad)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tmp_path)
    message = str(info.value)
    for name in ("model.layers.5.block_sparse_moe.experts.2.w3.weight", "lm_head.weight",
                 "model.layers.0.mlp.shared_expert.weight", "model.layers.3.self_attn.slope_rate",
                 "model.layers.7.self_attn.k_proj.weight: expected (32, 64), found (16, 64)"):
        assert name in message
    assert "2 missing" in message and "2 unexpected" in message and "1 mis-shaped" in message
    assert isinstance(info.value, ValueError)


def test_missing_files_are_reported(tmp_path, config):
    ref.write_checkpoint(tmp_path, config, {"model.norm.weight": np.ones(64, np.float32)})
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_mapping_covers_every_parameter_element_exactly_once(config):
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config))
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    covered = {path: np.zeros(shape, np.int32) for path, shape in shapes.items()}
    for m in official_tensor_mappings(config):
        slice_shape = shapes[m.param_path][len(m.index):]
        assert math.prod(slice_shape) == math.prod(m.official_shape), m.name
        covered[m.param_path][m.index] += 1
    for path, counts in covered.items():
        assert np.all(counts == 1), path


def test_official_layouts_match_the_spec(config, tensors, tmp_path):
    """Spot-check the transposes: the qkv row h*3D + j is q/k/v column j of head h, expert w2 is [hidden, inter]."""
    ref.write_checkpoint(tmp_path, config, tensors)
    model = from_pretrained(tmp_path)
    d = config.head_dim
    qkv = np.asarray(model.groups.layers[1].mixer.qkv_proj[...])[0]  # layer 1 = group 0, position 1
    official = tensors["model.layers.1.self_attn.qkv_proj.weight"]
    np.testing.assert_array_equal(qkv[:, 2, d:2 * d], official[2 * 3 * d + d:2 * 3 * d + 2 * d].T)  # k of head 2
    w2 = np.asarray(model.groups.layers[3].moe.w2[...])[1, 2]  # layer 7 = group 1, position 3; expert 2
    np.testing.assert_array_equal(w2, tensors["model.layers.7.block_sparse_moe.experts.2.w2.weight"].T)
    safetensors.numpy.save_file(to_official_tensors(model), tmp_path / "again.safetensors")
