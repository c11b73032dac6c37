"""The causal LM's forward pass up to the final norm, with a selectable remat policy per layer group.

``MiniMaxForCausalLM.__call__`` returns full fp32 logits and scans its layer groups without rematerialization.
Training needs the final hidden states (for the chunked cross-entropy) and remat inside the scan, so this module
drives the model's public parts (``embed_tokens``, the stacked ``groups``, ``final_norm``) the same way.
``tests/train/test_forward.py`` checks that it gives bitwise the model's own logits; once the model exposes
``hidden_states(..., remat_policy=...)`` this module becomes a call to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.model.norms_rope import rms_norm
from minimax_jax.model.transformer import MiniMaxForCausalLM, RouterStats

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def final_hidden_states(model: MiniMaxForCausalLM, input_ids: jax.Array, *, segment_ids: jax.Array | None,
                        positions: jax.Array | None, remat_policy: str = "none") -> tuple[jax.Array, RouterStats]:
    """Final-norm hidden states ``[batch, seq, hidden]`` (compute dtype) and the router statistics.

    ``remat_policy``: ``none`` keeps every activation; ``full`` recomputes each layer group in the backward pass;
    ``dots`` / ``dots_with_no_batch_dims`` keep matmul outputs (the jax.checkpoint_policies of those names).
    """
    if remat_policy != "none" and remat_policy not in _POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; known: none, {', '.join(_POLICIES)}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    config = model.config
    h = model.embed_tokens[...][input_ids].astype(model.dtype)
    graphdef, stacked = nnx.split(model.groups)

    def body(carry, xs):
        group_state, group_index = xs
        group = nnx.merge(graphdef, group_state)
        out, aux, counts = group(carry, group_index=group_index, positions=positions, segment_ids=segment_ids)
        return out, (aux, counts)

    if remat_policy != "none":
        body = jax.checkpoint(body, policy=_POLICIES[remat_policy], prevent_cse=False)
    group_indices = jnp.arange(config.num_layer_groups, dtype=jnp.int32)
    h, (aux, counts) = jax.lax.scan(body, h, (stacked, group_indices))
    h = rms_norm(h, model.final_norm.weight[...], model.final_norm.eps)
    return h, RouterStats(aux.reshape(-1), counts.reshape(config.num_hidden_layers, -1))
