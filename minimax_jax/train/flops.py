"""Model FLOPs per token of MiniMax-Text-01 training, for MFU (model FLOPs, not counting remat recompute).

Forward FLOPs per token:
- matmuls: 2 per multiply-add of every weight a token passes through: lightning qkv (h x 3HD), gate (h x HD) and
  output (HD x h); softmax q (h x HD), k and v (h x KD each), output (HD x h); router (h x E); top-k experts
  (k x 3 x h x I); lm_head (h x V). The embedding lookup is free.
- lightning attention (spec ``lightning_attention.md`` cost model): ``H * (4 C D + 4 D^2)`` with block C.
- causal softmax attention: ``QK^T`` and ``PV`` over on average T/2 keys: ``2 * 2 * H * D * T / 2 = 2 H D T``.
Training = 3 x forward (backward is twice the forward).
"""

from __future__ import annotations

from minimax_jax.config import LIGHTNING, ModelConfig

# Block length C of the spec's lightning cost model (the Triton kernel's block).
LIGHTNING_BLOCK = 64


def forward_flops_per_token(config: ModelConfig, seq_len: int, lightning_block: int = LIGHTNING_BLOCK) -> float:
    """Forward-pass FLOPs for one token of a ``seq_len`` sequence."""
    h, heads, kv_heads, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    lightning_matmul = 2 * (h * heads * 3 * d + h * heads * d + heads * d * h)
    lightning_mixing = heads * (4 * lightning_block * d + 4 * d * d)
    softmax_matmul = 2 * (h * heads * d + 2 * h * kv_heads * d + heads * d * h)
    softmax_mixing = 2 * heads * d * seq_len
    moe = 2 * (h * config.num_local_experts + config.num_experts_per_tok * 3 * h * config.intermediate_size)
    total = 2 * h * config.vocab_size
    for attn_type in config.attn_type_list:
        if attn_type == LIGHTNING:
            total += lightning_matmul + lightning_mixing
        else:
            total += softmax_matmul + softmax_mixing
        total += moe
    return float(total)


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (3 x forward)."""
    return 3.0 * forward_flops_per_token(config, seq_len)


def mfu(config: ModelConfig, seq_len: int, tokens_per_second: float, num_devices: int,
        peak_flops_per_device: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the devices' peak."""
    return train_flops_per_token(config, seq_len) * tokens_per_second / (num_devices * peak_flops_per_device)
