"""The FLOPs model on a case small enough to count by hand."""

import pytest

from minimax_jax.config import ModelConfig
from minimax_jax.train.flops import forward_flops_per_token, mfu, train_flops_per_token


def hand_config() -> ModelConfig:
    # h=4, 1 head of D=2 (1 kv head), E=2 experts of I=3, top-1, V=10, block C=2; layers: lightning, softmax.
    return ModelConfig(vocab_size=10, hidden_size=4, num_hidden_layers=2, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=2, attn_type_list=(0, 1), num_local_experts=2,
                       num_experts_per_tok=1, intermediate_size=3, rotary_dim=2)


def test_forward_flops_by_hand():
    seq = 8
    lightning = 2 * (4 * 6 + 4 * 2 + 2 * 4) + (4 * 2 * 2 + 4 * 2 * 2)  # 80 matmul + 32 mixing = 112
    softmax = 2 * (4 * 2 + 2 * 4 * 2 + 2 * 4) + 2 * 1 * 2 * seq  # 64 matmul + 32 causal mixing = 96
    moe = 2 * (4 * 2 + 1 * 3 * 4 * 3)  # router 16 + one expert's three 4x3 matmuls 72 = 88
    lm_head = 2 * 4 * 10  # 80
    expected = lightning + softmax + 2 * moe + lm_head  # 112 + 96 + 176 + 80 = 464
    assert expected == 464
    assert forward_flops_per_token(hand_config(), seq, lightning_block=2) == expected


def test_train_flops_and_mfu_with_the_default_block():
    # Default lightning block C = 64: mixing 1 * (4*64*2 + 4*2*2) = 528 instead of 32, so forward 464 - 32 + 528.
    assert train_flops_per_token(hand_config(), 8) == 3 * 960
    # 2880 FLOP/token * 1000 tokens/s over 2 devices of 2.88e6 FLOP/s peak each = 0.5
    assert mfu(hand_config(), 8, 1000.0, 2, 2.88e6) == pytest.approx(0.5)
