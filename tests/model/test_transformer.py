"""The scanned causal LM against an independent numpy forward; inputs validation; init and sharding metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax import from_pretrained
from minimax_jax.config import ModelConfig
from minimax_jax.model.transformer import MiniMaxForCausalLM
from tests.model import numpy_reference as ref

BATCH, SEQ = 2, 20  # two blocks of 8 plus a tail


def _packed_inputs(vocab):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, (BATCH, SEQ)).astype(np.int32)
    segments = np.stack([np.zeros(SEQ), np.repeat([0, 1, 2], [9, 6, 5])]).astype(np.int32)
    positions = np.stack([np.arange(SEQ), np.concatenate([np.arange(9), np.arange(6), np.arange(5)])])
    return ids, segments, positions.astype(np.int32)


@nnx.jit
def _forward(model, ids, segments, positions):
    return model(ids, segment_ids=segments, positions=positions, return_router_stats=True)


def test_scanned_model_matches_numpy_forward_with_packed_segments(tiny_model, tiny_config, tiny_tensors):
    ids, segments, positions = _packed_inputs(tiny_config.vocab_size)
    logits, stats = _forward(tiny_model, jnp.asarray(ids), jnp.asarray(segments), jnp.asarray(positions))
    assert logits.dtype == jnp.float32 and logits.shape == (BATCH, SEQ, tiny_config.vocab_size)
    want, aux, counts = ref.forward(tiny_config, tiny_tensors, ids, segments, positions)
    err = float(np.max(np.abs(np.asarray(logits) - want)))
    print(f"max |logit error| vs numpy float64: {err:.3e} (max |logit| {np.abs(want).max():.2f})")
    assert err <= 2e-5 * np.abs(want).max()  # fp32 parity, relative to the logit scale
    # Router stats of every layer, over the whole batch (B*T*k routed token-slots per layer).
    assert stats.aux_loss.shape == (tiny_config.num_hidden_layers,)
    assert stats.expert_counts.shape == (tiny_config.num_hidden_layers, tiny_config.num_local_experts)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), counts)
    assert counts.sum() == tiny_config.num_hidden_layers * BATCH * SEQ * tiny_config.num_experts_per_tok
    np.testing.assert_allclose(np.asarray(stats.aux_loss), aux, rtol=1e-5)


def test_bf16_compute_stays_close_to_fp32(tiny_checkpoint, tiny_config, tiny_tensors):
    ids, _, _ = _packed_inputs(tiny_config.vocab_size)
    want, _, _ = ref.forward(tiny_config, tiny_tensors, ids)
    model16 = from_pretrained(tiny_checkpoint, dtype=jnp.bfloat16)
    assert model16.lm_head[...].dtype == jnp.bfloat16
    bf16 = nnx.jit(lambda m, x: m(x))(model16, jnp.asarray(ids))
    assert bf16.dtype == jnp.float32
    per_token = np.max(np.abs(np.asarray(bf16) - want), axis=-1) / np.abs(want).max()
    print(f"bf16 vs float64 per-token relative logit error: median {np.median(per_token):.3e}, "
          f"max {per_token.max():.3e}")
    # bf16 keeps 8 mantissa bits (eps 7.8e-3): typical tokens stay within ~2 eps after eight layers. A few tokens may
    # differ more because a near-tie in the router picks another expert in bf16 (a discontinuity, not a precision
    # bug), so the bound is on the median and on most tokens, not on the worst one.
    assert np.median(per_token) < 2e-2
    assert np.mean(per_token < 3e-2) >= 0.8


@pytest.fixture(scope="module")
def abstract_tiny(tiny_config):
    return nnx.eval_shape(lambda: MiniMaxForCausalLM(tiny_config.replace(max_position_embeddings=16)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_ids": np.zeros((4,), np.int32)}, "shape"),
    ({"input_ids": np.zeros((1, 4), np.float32)}, "integer"),
    ({"input_ids": np.zeros((1, 17), np.int32)}, "max_position_embeddings"),
    ({"input_ids": np.zeros((1, 4), np.int32), "segment_ids": np.zeros((1, 5), np.int32)}, "segment_ids"),
    ({"input_ids": np.zeros((1, 4), np.int32), "positions": np.zeros((2, 4), np.int32)}, "positions"),
])
def test_bad_inputs_raise_value_error_naming_the_problem(abstract_tiny, kwargs, message):
    kwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}
    input_ids = kwargs.pop("input_ids")
    with pytest.raises(ValueError, match=message):
        abstract_tiny(input_ids, **kwargs)


def test_params_carry_logical_axis_names_with_a_stacked_layers_axis(abstract_tiny, tiny_config):
    groups = tiny_config.num_layer_groups
    layer = abstract_tiny.groups.layers[0]
    assert abstract_tiny.embed_tokens.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert abstract_tiny.lm_head.get_metadata()["out_sharding"] == ("embed", "vocab")
    assert layer.moe.w13.get_metadata()["out_sharding"] == ("layers", "expert", None, "embed", "mlp")
    assert layer.moe.w13.get_value().shape == (groups, tiny_config.num_local_experts, 2, tiny_config.hidden_size,
                                               tiny_config.intermediate_size)
    assert layer.mixer.qkv_proj.get_metadata()["out_sharding"][0] == "layers"
    last = abstract_tiny.groups.layers[tiny_config.layer_group_size - 1]
    assert last.mixer.k_proj.get_metadata()["out_sharding"] == ("layers", "embed", "kv_heads", "head_dim")


def test_random_init_is_normal_002_with_unit_norms():
    config = ModelConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, attn_type_list=(0, 1, 0, 1), num_local_experts=2,
                         num_experts_per_tok=1, intermediate_size=16, max_position_embeddings=64)
    model = MiniMaxForCausalLM(config, rngs=nnx.Rngs(0))
    embed = np.asarray(model.embed_tokens[...])
    assert embed.std() == pytest.approx(0.02, rel=0.05) and abs(embed.mean()) < 1e-3
    np.testing.assert_array_equal(np.asarray(model.final_norm.weight[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(model.groups.layers[0].mixer.norm[...]), 1.0)
    w13 = np.asarray(model.groups.layers[0].moe.w13[...])
    assert not np.allclose(w13[0], w13[1]), "layer groups must get different random weights"
    assert not np.allclose(w13[:, :, 0], w13[:, :, 1]), "W1 and W3 must get different random weights"
    assert jax.tree.reduce(lambda a, b: a and b, jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))),
                                                              nnx.state(model)))
