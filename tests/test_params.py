"""Parameter counts from the abstract model."""

import time

import pytest

from minimax_jax import count_params
from minimax_jax.config import minimax_text_01, tiny


def test_released_model_has_456b_total_and_45_9b_active_parameters():
    start = time.perf_counter()
    counts = count_params(minimax_text_01())
    elapsed = time.perf_counter() - start
    print(f"minimax_text_01: total {counts.total:,} active {counts.active:,} in {elapsed:.2f}s")
    assert round(counts.total / 1e9, 2) == 456.09
    assert round(counts.active / 1e9, 2) == 45.94
    # eval_shape allocates nothing: materializing 456B fp32 params (1.8 TB) would be impossible, let alone fast.
    assert elapsed < 20


def test_tiny_counts_equal_a_hand_formula():
    c = tiny()
    hidden, heads, kv, d, e, inter = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                      c.num_local_experts, c.intermediate_size)
    lightning = 3 * heads * d * hidden + 2 * heads * d * hidden + heads * d
    softmax = 2 * heads * d * hidden + 2 * kv * d * hidden
    experts = e * 3 * hidden * inter
    per_layer_common = 2 * hidden + e * hidden  # two norms + router
    n_lightning = c.attn_type_list.count(0)
    n_softmax = c.attn_type_list.count(1)
    layers = n_lightning * lightning + n_softmax * softmax + c.num_hidden_layers * per_layer_common
    total = layers + c.num_hidden_layers * experts + 2 * c.vocab_size * hidden + hidden
    active = layers + c.num_hidden_layers * experts * c.num_experts_per_tok // e + hidden
    counts = count_params(c)
    assert counts.total == total
    assert counts.active == pytest.approx(active, abs=0)
