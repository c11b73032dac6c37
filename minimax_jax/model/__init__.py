"""The MiniMax-Text-01 model: pure math functions and thin Flax NNX modules around them."""

from minimax_jax.model.transformer import DecoderLayer, LayerGroup, MiniMaxForCausalLM, RouterStats

__all__ = ["DecoderLayer", "LayerGroup", "MiniMaxForCausalLM", "RouterStats"]
