"""Parameter counts of a configuration, read off the abstract model (``nnx.eval_shape``: nothing is allocated)."""

from __future__ import annotations

import math
from typing import NamedTuple

from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model.transformer import MiniMaxForCausalLM

# Parameters outside the per-token compute path, excluded from the active count.
_EMBEDDING_PARAMS = {("embed_tokens",), ("lm_head",)}
# Routed-expert weights: a token uses k of E experts.
_EXPERT_PARAM_NAMES = {"w13", "w2"}


class ParamCounts(NamedTuple):
    total: int  # every parameter
    active: int  # used per token, excluding embeddings and lm_head; experts counted k/E


def count_params(config: ModelConfig) -> ParamCounts:
    """Total and active-per-token parameter counts of ``config``'s model."""
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config))
    total, active = 0, 0.0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = math.prod(var.get_value().shape)
        total += size
        if path in _EMBEDDING_PARAMS:
            continue
        if path[-1] in _EXPERT_PARAM_NAMES and "moe" in path:
            active += size * config.num_experts_per_tok / config.num_local_experts
        else:
            active += size
    return ParamCounts(total, round(active))
