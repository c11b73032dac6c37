"""Config files load, dotted overrides are typed, and a typo fails with a message naming the key."""

from pathlib import Path

import pytest

from minimax_jax.train.config import ConfigOverrideError, TrainConfig, apply_overrides, load_config_file

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny", "small", "minimax_text_01"])
def test_config_files_load(name):
    config = load_config_file(CONFIGS / f"{name}.py")
    assert isinstance(config, TrainConfig)
    assert config.seq_len <= config.model.max_position_embeddings


def test_overrides_are_parsed_by_field_type():
    config = apply_overrides(load_config_file(CONFIGS / "tiny.py"), {
        "optimizer.learning_rate": "1e-3", "num_steps": "7", "optimizer.grad_clip_norm": "None",
        "checkpoint.async_save": "false", "data.sources": "a.txt,b.jsonl", "mesh.axis_sizes": "(2, -1)",
        "mesh.axis_names": "data,expert", "loss_chunk_size": "32", "model.rope_theta": "500.0",
    })
    assert config.optimizer.learning_rate == 1e-3 and config.num_steps == 7
    assert config.optimizer.grad_clip_norm is None and config.checkpoint.async_save is False
    assert config.data.sources == ("a.txt", "b.jsonl")
    assert config.mesh.axis_sizes == (2, -1) and config.mesh.axis_names == ("data", "expert")
    assert config.loss_chunk_size == 32 and config.model.rope_theta == 500.0


def test_num_hidden_layers_override_repeats_the_group_pattern():
    config = apply_overrides(load_config_file(CONFIGS / "tiny.py"), {"model.num_hidden_layers": "4"})
    assert config.model.attn_type_list == (0, 0, 0, 1)
    with pytest.raises(ConfigOverrideError, match="model.num_hidden_layers"):
        apply_overrides(config, {"model.num_hidden_layers": "6"})


@pytest.mark.parametrize("key", ["optimizer.learnig_rate", "num_step", "model.hidden", "seq_len.x"])
def test_unknown_key_is_an_error_naming_it(key):
    with pytest.raises(ConfigOverrideError, match=key.replace(".", r"\.")):
        apply_overrides(load_config_file(CONFIGS / "tiny.py"), {key: "1"})


@pytest.mark.parametrize("key,value", [("num_steps", "ten"), ("checkpoint.async_save", "maybe"),
                                       ("remat_policy", "sometimes"), ("loss_chunk_size", "5")])
def test_bad_value_is_an_error_naming_the_key(key, value):
    with pytest.raises(ConfigOverrideError, match=key.replace(".", r"\.")):
        apply_overrides(load_config_file(CONFIGS / "tiny.py"), {key: value})
