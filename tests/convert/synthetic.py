"""Synthetic official-format checkpoints of any size, written one tensor at a time (for converter tests)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from minimax_jax.checkpoint import official_tensor_mappings
from minimax_jax.config import ModelConfig
from minimax_jax.convert.safetensors_format import TensorSpec, write_folder

BF16 = np.dtype(ml_dtypes.bfloat16)


def wide_config() -> ModelConfig:
    """Four wide layers (3 lightning + 1 softmax), 8 experts: 1.8 GB of bf16, no tensor above 34 MB."""
    return ModelConfig(vocab_size=8192, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=128, attn_type_list=(0, 0, 0, 1), num_local_experts=8,
                       num_experts_per_tok=2, intermediate_size=4096, layernorm_linear_attention_alpha=8**0.25,
                       layernorm_full_attention_alpha=8**0.25, layernorm_mlp_alpha=8**0.25)


class RandomBf16:
    """Finite bf16 values in about [2**-31, 2): windows at per-tensor offsets into one random pool (fast)."""

    def __init__(self, max_elements: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self._pool = rng.integers(0x3000, 0x4000, size=2 * max_elements, dtype=np.uint16).view(BF16)
        self._rng = rng

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        start = int(self._rng.integers(0, len(self._pool) - size + 1))
        return self._pool[start:start + size].reshape(shape)


def write_synthetic(folder: str, config: ModelConfig, max_shard_bytes: int = 600 * 2**20) -> int:
    """Writes config.json and sharded bf16 safetensors for ``config``; returns the bytes of tensor data."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_official_dict(), f)
    specs = [TensorSpec(m.name, BF16, m.official_shape) for m in official_tensor_mappings(config)]
    random = RandomBf16(max(int(np.prod(s.shape)) for s in specs))
    write_folder(folder, specs, lambda s: random(s.shape), max_shard_bytes)
    return sum(s.nbytes for s in specs)
