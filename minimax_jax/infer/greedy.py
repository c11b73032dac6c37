"""Greedy continuation by re-running the full forward pass: simple and exact, O(n^2) in the generated length.

The model is causal (lightning state, softmax mask and MoE are all per-token causal), so running it on a fixed-size
buffer whose tail is still zeros gives the right logits at every filled position; one compiled program serves all
steps. Cached prefill + decode replaces this for real generation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.model.transformer import MiniMaxForCausalLM


def greedy_generate_uncached(model: MiniMaxForCausalLM, prompt_ids: jax.Array, max_new_tokens: int) -> jax.Array:
    """``prompt_ids`` int32 ``[batch, prompt_len]`` -> ``[batch, prompt_len + max_new_tokens]`` (prompt included)."""
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [batch, prompt_len] with prompt_len >= 1, got shape {prompt_ids.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    graphdef, state = nnx.split(model)
    buffer = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt_ids.astype(jnp.int32))
    return _generate(graphdef, state, buffer, prompt_len)


@jax.jit(static_argnums=(0, 3))
def _generate(graphdef, state, buffer: jax.Array, prompt_len: int) -> jax.Array:
    model = nnx.merge(graphdef, state)

    def step(t, buf):
        next_token = jnp.argmax(model(buf)[:, t - 1], axis=-1).astype(jnp.int32)
        return buf.at[:, t].set(next_token)

    return jax.lax.fori_loop(prompt_len, buffer.shape[1], step, buffer)
