"""ModelConfig: validation errors name the field; presets; both config.json formats."""

import json

import pytest

from minimax_jax.config import ConfigError, ModelConfig, get_preset, minimax_text_01, small, tiny


def test_released_preset_matches_the_spec():
    c = minimax_text_01()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (200_064, 6144, 80)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim) == (64, 8, 128, 64)
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size) == (32, 2, 9216)
    assert c.attn_type_list == ((0,) * 7 + (1,)) * 10
    assert [i for i, t in enumerate(c.attn_type_list) if t == 1] == list(range(7, 80, 8))
    assert c.layernorm_mlp_alpha == pytest.approx(3.5565588200778455, rel=1e-15)
    assert c.layernorm_linear_attention_beta == 1.0 and c.rope_theta == 1e7 and c.eos_token_id == 200_020
    assert (c.layer_group_size, c.num_layer_groups) == (8, 10)


def test_small_and_tiny_presets_keep_the_released_shape_of_things():
    s = small()
    assert s.head_dim == 128 and s.num_experts_per_tok == 2 and s.group_pattern == (0,) * 7 + (1,)
    t = tiny()
    assert t.num_layer_groups == 2 and t.attn_type_list.count(1) == 2
    assert get_preset("tiny") == t
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 3}, "num_attention_heads .* divisible by num_key_value_heads"),
        ({"rotary_dim": 7}, "rotary_dim must be even"),
        ({"rotary_dim": 32}, "rotary_dim must be even and in \\(0, head_dim=16\\]"),
        ({"attn_type_list": (0, 1)}, "attn_type_list has 2 entries but num_hidden_layers is 8"),
        ({"attn_type_list": (0, 2) * 4}, "attn_type_list entries must be 0"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok \\(5\\) exceeds num_local_experts \\(4\\)"),
        ({"postnorm": False}, "postnorm=false is not supported"),
        ({"shared_intermediate_size": 64}, "shared expert is not supported"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_invalid_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        tiny().replace(**change)


def test_layer_group_size_finds_the_shortest_period():
    t = tiny()
    assert t.replace(attn_type_list=(0, 1) * 4).layer_group_size == 2
    assert t.replace(attn_type_list=(0,) * 8).layer_group_size == 1
    assert t.replace(attn_type_list=(0, 0, 0, 0, 0, 1, 1, 1)).layer_group_size == 8


def test_official_dict_round_trip_and_json(tmp_path):
    c = minimax_text_01()
    raw = c.to_official_dict()
    assert raw["attn_type_list"][:8] == [0] * 7 + [1]
    assert ModelConfig.from_dict(raw) == c
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert ModelConfig.from_json(tmp_path) == c


def _released_official_json() -> dict:
    """The key set of MiniMaxAI/MiniMax-Text-01's config.json (values of the released model)."""
    return {
        "architectures": ["MiniMaxText01ForCausalLM"], "attention_dropout": 0.0,
        "attn_type_list": [0, 0, 0, 0, 0, 0, 0, 1] * 10,
        "auto_map": {"AutoConfig": "configuration_minimax_text_01.MiniMaxText01Config"},
        "bos_token_id": None, "eos_token_id": None, "head_dim": 128, "hidden_act": "silu", "hidden_size": 6144,
        "initializer_range": 0.02, "intermediate_size": 9216,
        "layernorm_full_attention_alpha": 3.5565588200778455, "layernorm_full_attention_beta": 1.0,
        "layernorm_linear_attention_alpha": 3.5565588200778455, "layernorm_linear_attention_beta": 1.0,
        "layernorm_mlp_alpha": 3.5565588200778455, "layernorm_mlp_beta": 1.0,
        "max_position_embeddings": 10240000, "model_type": "minimax_text_01", "num_attention_heads": 64,
        "num_experts_per_tok": 2, "num_hidden_layers": 80, "num_key_value_heads": 8, "num_local_experts": 32,
        "output_router_logits": False, "postnorm": True, "rms_norm_eps": 1e-05, "rope_theta": 10000000,
        "rotary_dim": 64, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "shared_intermediate_size": 0, "shared_moe_mode": "sigmoid", "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.45.2",
        "use_cache": True, "vocab_size": 200064,
    }


def test_reads_the_released_official_config():
    c = ModelConfig.from_dict(_released_official_json())
    assert c == minimax_text_01().replace(eos_token_id=None)


def test_reads_transformers_format():
    raw = {
        "architectures": ["MiniMaxForCausalLM"], "model_type": "minimax", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"], "block_size": 8,
        "full_attn_alpha_factor": 1.5, "full_attn_beta_factor": 1.0, "linear_attn_alpha_factor": 1.25,
        "linear_attn_beta_factor": 0.5, "mlp_alpha_factor": 1.75, "mlp_beta_factor": 1.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5, "dtype": "float32", "transformers_version": "5.23.0", "sliding_window": None,
    }
    c = ModelConfig.from_dict(raw)
    assert c.attn_type_list == (0, 0, 0, 1)
    assert c.rotary_dim == 16  # transformers rotates the whole head
    assert (c.layernorm_full_attention_alpha, c.layernorm_linear_attention_alpha) == (1.5, 1.25)
    assert (c.layernorm_linear_attention_beta, c.layernorm_mlp_alpha, c.rope_theta) == (0.5, 1.75, 1e7)
    partial = dict(raw, rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5})
    assert ModelConfig.from_dict(partial).rotary_dim == 8


@pytest.mark.parametrize(
    "change, message",
    [
        ({"some_new_knob": 3}, "unknown keys .*some_new_knob"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"shared_intermediate_size": 1024}, "shared expert"),
        ({"postnorm": False}, "postnorm=false"),
    ],
)
def test_official_keys_that_change_the_math_are_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(_released_official_json() | change)


def test_transformers_format_rejects_unsupported_rope_and_layer_types():
    base = {"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "num_local_experts": 1, "num_experts_per_tok": 1, "intermediate_size": 4,
            "layer_types": ["full_attention"]}
    assert ModelConfig.from_dict(base).head_dim == 8
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        ModelConfig.from_dict(base | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(ConfigError, match="unknown layer type 'sliding_attention'"):
        ModelConfig.from_dict(base | {"layer_types": ["sliding_attention"]})
    with pytest.raises(ConfigError, match="missing required keys \\['num_local_experts'\\]"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "num_local_experts"})
    with pytest.raises(ConfigError, match="neither 'attn_type_list'"):
        ModelConfig.from_dict({"vocab_size": 8})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_json(tmp_path)


@pytest.mark.parametrize("preset", [minimax_text_01, tiny])
def test_export_config_carries_both_key_sets_and_reads_back(preset):
    c = preset()
    raw = c.to_export_dict("bfloat16")
    assert ModelConfig.from_dict(raw) == c
    assert raw["model_type"] == "minimax" and raw["dtype"] == raw["torch_dtype"] == "bfloat16"
    assert raw["attn_type_list"] == [{"linear_attention": 0, "full_attention": 1}[t] for t in raw["layer_types"]]
    assert raw["mlp_alpha_factor"] == raw["layernorm_mlp_alpha"] == c.layernorm_mlp_alpha
    assert raw["rope_parameters"] == {"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": 0.5}
    # Each key set alone also describes the model (the transformers keys up to its RoPE defect).
    official_only = {k: v for k, v in raw.items() if k not in c.to_transformers_keys()}
    assert ModelConfig.from_dict(official_only) == c
    official_names = {"attn_type_list", "postnorm", "rotary_dim", "rope_theta", "shared_intermediate_size",
                      "torch_dtype"} | {k for k in raw if k.startswith("layernorm_")}
    transformers_only = {k: v for k, v in raw.items() if k not in official_names}
    assert ModelConfig.from_dict(transformers_only) == c


def test_released_config_with_consistent_transformers_keys_is_accepted():
    official = _released_official_json()
    both = official | minimax_text_01().to_transformers_keys() | {"mlp_alpha_factor": 3.556558820077845}  # 1 ulp off
    assert ModelConfig.from_dict(both) == ModelConfig.from_dict(official)
    without_partial = both | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e7}}
    assert ModelConfig.from_dict(without_partial).rotary_dim == 64  # transformers ignores partial RoPE anyway


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["full_attention", "linear_attention"] * 40},
         r"attn_type_list: inconsistent .*'layer_types' means \(1, 0"),
        ({"mlp_alpha_factor": 1.0}, r"layernorm_mlp_alpha: inconsistent .*'mlp_alpha_factor' means 1.0"),
        ({"linear_attn_beta_factor": 0.5}, "layernorm_linear_attention_beta: inconsistent"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
         r"rope_theta: inconsistent .*'rope_parameters.rope_theta' means 1000000.0"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 1.0}},
         r"rotary_dim: inconsistent .*official 'rotary_dim' means 64, .*partial_rotary_factor' means 128"),
        ({"rope_theta": 5.0}, r"rope_theta: inconsistent .*official 'rope_theta' means 5.0"),
        ({"some_new_knob": 3}, r"unknown keys in official\+transformers-format config.json .*some_new_knob"),
        ({"postnorm": False}, "postnorm=false"),
    ],
)
def test_inconsistent_duplicates_are_errors_naming_the_field(change, message):
    both = _released_official_json() | minimax_text_01().to_transformers_keys()
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(both | change)


def test_absent_transformers_factor_means_its_default_and_must_agree():
    """transformers reads an absent *_alpha_factor as 1: a two-format config must not leave it out when alpha != 1."""
    both = _released_official_json() | minimax_text_01().to_transformers_keys()
    del both["full_attn_alpha_factor"]
    with pytest.raises(ConfigError, match=r"layernorm_full_attention_alpha: .*'full_attn_alpha_factor' means 1.0"):
        ModelConfig.from_dict(both)


def test_transformers_default_rope_theta_is_minimax_configs():
    base = {"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "num_local_experts": 1, "num_experts_per_tok": 1, "intermediate_size": 4,
            "layer_types": ["full_attention"]}
    assert ModelConfig.from_dict(base).rope_theta == 1e6  # MiniMaxConfig.default_theta
