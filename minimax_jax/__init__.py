"""JAX/Flax NNX implementation of MiniMax-Text-01 (lightning attention + softmax attention + MoE)."""

from minimax_jax.checkpoint import CheckpointError, from_pretrained, to_official_tensors
from minimax_jax.config import ModelConfig
from minimax_jax.model.transformer import MiniMaxForCausalLM, RouterStats
from minimax_jax.params import ParamCounts, count_params

__all__ = ["CheckpointError", "MiniMaxForCausalLM", "ModelConfig", "ParamCounts", "RouterStats", "count_params",
           "from_pretrained", "to_official_tensors"]
