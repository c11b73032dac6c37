"""Decoder layer, the scanned layer stack and the causal LM of MiniMax-Text-01."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from minimax_jax.config import LIGHTNING, ModelConfig
from minimax_jax.model.attention import SoftmaxAttention
from minimax_jax.model.cache import KVCache, LightningCache
from minimax_jax.model.explicit_sharding import explicit_spec
from minimax_jax.model.lightning import LightningMixer
from minimax_jax.model.moe import MoE
from minimax_jax.model.norms_rope import RMSNorm
from minimax_jax.model.params_init import normal_param
from pallas_kernels.add_rms_norm import add_rms_norm
from pallas_kernels.checkpoint_names import KERNEL_OUTPUT


class RouterStats(NamedTuple):
    """Per-layer router statistics for training (layer order = global layer index)."""

    aux_loss: jax.Array  # fp32 [num_layers], Switch-style loss of each layer's router
    expert_counts: jax.Array  # int32 [num_layers, E], routed token-slots per expert


class Residual(NamedTuple):
    """A layer's input ``scales[0] * x + scales[1] * y`` kept as its two terms: the layer's input norm adds them
    in the same pass (``pallas_kernels.add_rms_norm``)."""

    x: jax.Array  # the previous layer's normalized MoE input (the embedding before the first layer)
    y: jax.Array  # the previous layer's MoE output (zeros before the first layer)
    scales: jax.Array  # fp32 [2]: (mlp alpha, mlp beta); (1, 0) before the first layer

    @classmethod
    def of(cls, h: jax.Array) -> Residual:
        """``h`` itself as a residual sum."""
        return cls(h, jnp.zeros_like(h), jnp.array([1.0, 0.0], jnp.float32))


def normalized_sum(norm: RMSNorm, residual: Residual) -> tuple[jax.Array, jax.Array]:
    """``norm(scales[0] * x + scales[1] * y)``, twice: one copy per consumer, so that the kernel's backward pass
    adds their gradients (``add_rms_norm``). Remat policies keep it like a kernel's output."""
    out, again = add_rms_norm(residual.x, residual.y, norm.weight[...], residual.scales, norm.eps)
    return checkpoint_name(out, KERNEL_OUTPUT), checkpoint_name(again, KERNEL_OUTPUT)


class DecoderLayer(nnx.Module):
    """One postnorm layer: ``h1 = a_attn xn + b_attn mixer(xn)``, ``out = a_mlp hn + b_mlp moe(hn)``."""

    def __init__(self, config: ModelConfig, attn_type: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.is_lightning = attn_type == LIGHTNING
        if self.is_lightning:
            self.attn_alpha = config.layernorm_linear_attention_alpha
            self.attn_beta = config.layernorm_linear_attention_beta
            self.mixer = LightningMixer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.attn_alpha = config.layernorm_full_attention_alpha
            self.attn_beta = config.layernorm_full_attention_beta
            self.mixer = SoftmaxAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_alpha, self.mlp_beta = config.layernorm_mlp_alpha, config.layernorm_mlp_beta
        self.input_norm = RMSNorm((hidden,), eps=eps, axes=("embed",), param_dtype=param_dtype)
        self.post_attention_norm = RMSNorm((hidden,), eps=eps, axes=("embed",), param_dtype=param_dtype)
        self.moe = MoE(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: Residual, *, layer_index: jax.Array | int, positions: jax.Array,
                 segment_ids: jax.Array | None) -> tuple[Residual, jax.Array, jax.Array]:
        """Returns the layer output (as the sum the next norm takes), the router aux loss and the expert counts."""
        # named scopes label the ops in profiles (scripts/trace_summary.py groups device time by them)
        with jax.named_scope("norms_residual"):
            xn, xn_residual = normalized_sum(self.input_norm, h)
        if self.is_lightning:
            with jax.named_scope("lightning_attention"):
                mixed = self.mixer(xn, layer_index=layer_index, segment_ids=segment_ids)
        else:
            with jax.named_scope("softmax_attention"):
                mixed = self.mixer(xn, positions=positions, segment_ids=segment_ids)
        with jax.named_scope("norms_residual"):
            attn_scales = jnp.array([self.attn_alpha, self.attn_beta], jnp.float32)
            hn, hn_residual = normalized_sum(self.post_attention_norm,
                                             Residual(xn_residual, mixed.astype(xn.dtype), attn_scales))
        with jax.named_scope("moe"):
            moe = self.moe(hn)
        mlp_scales = jnp.array([self.mlp_alpha, self.mlp_beta], jnp.float32)
        out = Residual(hn_residual, moe.output.astype(hn.dtype), mlp_scales)
        return out, moe.aux_loss, moe.expert_counts

    def call_with_cache(self, h: jax.Array, *, layer_index: jax.Array | int, entry: LightningCache | KVCache,
                        positions: jax.Array, valid: jax.Array, cache_index: jax.Array, key_start: jax.Array,
                        kv_block: int | None) -> tuple[jax.Array, LightningCache | KVCache]:
        """Cached inference on a chunk (see ``model/cache.py``): the layer output and this layer's updated cache.

        ``valid`` bool ``[batch, chunk]`` marks real tokens (padding never enters a lightning state);
        ``positions`` are RoPE positions; the chunk occupies slots ``cache_index + i``.
        """
        xn = self.input_norm(h)
        if self.is_lightning:
            mixed, state = self.mixer.call_with_state(xn, layer_index=layer_index, state=entry.state, valid=valid)
            entry = LightningCache(state)
        else:
            mixed, keys, values = self.mixer.call_with_cache(
                xn, positions=positions, keys=entry.keys, values=entry.values, cache_index=cache_index,
                key_start=key_start, kv_block=kv_block)
            entry = KVCache(keys, values)
        hn = self.post_attention_norm(self.attn_alpha * xn + self.attn_beta * mixed.astype(xn.dtype))
        return self.mlp_alpha * hn + self.mlp_beta * self.moe(hn).output.astype(hn.dtype), entry


class LayerGroup(nnx.Module):
    """One period of ``config.group_pattern`` (7 lightning + 1 softmax in the released model)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(config, t, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for t in config.group_pattern])

    def __call__(self, h: Residual, *, group_index: jax.Array | int, positions: jax.Array,
                 segment_ids: jax.Array | None) -> tuple[Residual, jax.Array, jax.Array]:
        """Returns the group output, aux losses ``[group_size]`` and expert counts ``[group_size, E]``."""
        aux_losses, counts = [], []
        for offset, layer in enumerate(self.layers):
            h, aux, count = layer(h, layer_index=group_index * len(self.layers) + offset, positions=positions,
                                  segment_ids=segment_ids)
            aux_losses.append(aux)
            counts.append(count)
        return h, jnp.stack(aux_losses), jnp.stack(counts)

    def call_with_cache(self, h: jax.Array, *, group_index: jax.Array | int,
                        entries: tuple[LightningCache | KVCache, ...],
                        **chunk) -> tuple[jax.Array, tuple[LightningCache | KVCache, ...]]:
        """Cached inference through the group's layers; ``chunk`` is passed to ``DecoderLayer.call_with_cache``.

        ``group_index`` may be traced (the scan over the stacked groups); ``entries`` are this group's caches."""
        new_entries = []
        for offset, (layer, entry) in enumerate(zip(self.layers, entries, strict=True)):
            h, entry = layer.call_with_cache(h, layer_index=group_index * len(self.layers) + offset, entry=entry,
                                             **chunk)
            new_entries.append(entry)
        return h, tuple(new_entries)


# Rematerialization of each scanned layer group (None: keep every activation).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # also keeps the custom kernels' outputs (KERNEL_OUTPUT): the backward pass does not rerun the MoE's grouped
    # matmuls or the lightning recurrence
    "dots_and_kernel_outputs": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(KERNEL_OUTPUT)),
}


def embed_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]``; under a mesh with Explicit axes the rows come out sharded like ``ids`` (batch, sequence),
    which the gather cannot infer on its own."""
    spec = explicit_spec(ids)
    if spec is None:
        return table[ids]
    return table.at[ids].get(out_sharding=jax.sharding.PartitionSpec(*spec, None))


def _stacked_groups(config: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs) -> LayerGroup:
    """``num_layer_groups`` LayerGroups with their params stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=config.num_layer_groups)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> LayerGroup:
        return LayerGroup(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    return make(rngs)


class MiniMaxForCausalLM(nnx.Module):
    """MiniMax-Text-01 causal LM: ``model(input_ids)`` -> fp32 logits ``[batch, seq, vocab]``.

    The decoder scans over ``config.num_layer_groups`` repeats of one layer group, so compile time does not grow
    with depth. ``dtype`` is the compute dtype of matmuls; ``param_dtype`` the storage dtype of the weights.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
        param_dtype = dtype if param_dtype is None else param_dtype
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.dtype = dtype
        self.embed_tokens = normal_param(rngs, (config.vocab_size, config.hidden_size), param_dtype,
                                         ("vocab", "embed"))
        self.groups = _stacked_groups(config, dtype, param_dtype, rngs)
        self.final_norm = RMSNorm((config.hidden_size,), eps=config.rms_norm_eps, axes=("embed",),
                                  param_dtype=param_dtype)
        self.lm_head = normal_param(rngs, (config.hidden_size, config.vocab_size), param_dtype, ("embed", "vocab"))

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, return_router_stats: bool = False
                 ) -> jax.Array | tuple[jax.Array, RouterStats]:
        """Logits for ``input_ids`` int ``[batch, seq]``.

        Args:
          segment_ids: optional int ``[batch, seq]`` for packed sequences: attention (both kinds) stays within a
            segment. Positions are not reset per segment unless given in ``positions``.
          positions: optional absolute 0-based positions int ``[batch, seq]`` (default ``arange(seq)``).
          return_router_stats: also return ``RouterStats`` (aux losses and expert counts of every layer).
        """
        h, stats = self.hidden_states(input_ids, segment_ids=segment_ids, positions=positions)
        # fp32 logits: fp32 accumulation of the compute-dtype matmul (exact fp32 when dtype is fp32).
        logits = jnp.einsum("btd,dv->btv", h, self.lm_head[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return (logits, stats) if return_router_stats else logits

    def hidden_states(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None, remat_policy: str = "none", scan_layers: bool = True
                      ) -> tuple[jax.Array, RouterStats]:
        """Final-norm hidden states ``[batch, seq, hidden]`` (compute dtype) and the router statistics.

        Training computes the loss from these chunk by chunk instead of materializing all logits.
        ``remat_policy``: ``none`` keeps every activation; ``full`` recomputes each layer group in the backward
        pass; ``dots`` / ``dots_with_no_batch_dims`` keep matmul outputs (the jax.checkpoint_policies of those names);
        ``dots_and_kernel_outputs`` also keeps the custom kernels' outputs
        (``pallas_kernels.checkpoint_names.KERNEL_OUTPUT``).
        ``scan_layers``: loop over the layer groups (compile time independent of depth); False unrolls the loop,
        which saves stacking the activations kept for the backward pass (zero-filling and copying them into
        ``[groups, ...]`` buffers) at the cost of longer compiles and more memory.
        """
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}; known: {', '.join(REMAT_POLICIES)}")
        positions = self._check_inputs(input_ids, segment_ids, positions)
        with jax.named_scope("embed"):
            h = embed_lookup(self.embed_tokens[...], input_ids).astype(self.dtype)
        graphdef, stacked = nnx.split(self.groups)

        def body(carry, xs):
            group_state, group_index = xs
            group = nnx.merge(graphdef, group_state)
            out, aux, counts = group(carry, group_index=group_index, positions=positions, segment_ids=segment_ids)
            return out, (aux, counts)

        if REMAT_POLICIES[remat_policy] is not None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
        group_indices = jnp.arange(self.config.num_layer_groups, dtype=jnp.int32)
        residual, (aux, counts) = jax.lax.scan(body, Residual.of(h), (stacked, group_indices),
                                               unroll=not scan_layers)
        with jax.named_scope("norms_residual"):
            h, _ = normalized_sum(self.final_norm, residual)
        return h, RouterStats(aux.reshape(-1), counts.reshape(self.config.num_hidden_layers, -1))

    def _check_inputs(self, input_ids, segment_ids, positions) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got shape {tuple(input_ids.shape)}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array (int32), got dtype {input_ids.dtype}")
        seq = input_ids.shape[1]
        if seq > self.config.max_position_embeddings:
            raise ValueError(f"input_ids sequence length {seq} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if arr is None:
                continue
            if tuple(arr.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(arr.shape)}")
            if not jnp.issubdtype(arr.dtype, jnp.integer):
                raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), input_ids.shape)
        return positions


# The weights that the model reads only as ``weight.astype(compute dtype)``, each in one matmul (qkv_proj and
# output_gate are concatenated first, which commutes with the cast).
MATMUL_WEIGHTS = frozenset({"qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                            "router", "w13", "w2"})


def cast_matmul_weights(params: dict, dtype) -> dict:
    """``params`` (the model's pure dict) with the ``MATMUL_WEIGHTS`` cast to the compute ``dtype``.

    The model computes the same values from this copy. Its gradients for those weights are the compute-dtype
    cotangents that the fp32 gradients are exact conversions of: a trainer that differentiates with respect to the
    copy keeps them in half the bytes. The embedding table and lm_head stay as they are: their gradients are sums
    over tokens or loss chunks accumulated in fp32. So do the norm scales (a few kilobytes; the GPU norm kernel sums
    their gradients in fp32).
    """

    def cast(path, leaf):
        return leaf.astype(dtype) if getattr(path[-1], "key", None) in MATMUL_WEIGHTS else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


__all__ = ["MATMUL_WEIGHTS", "DecoderLayer", "LayerGroup", "MiniMaxForCausalLM", "Residual", "RouterStats",
           "cast_matmul_weights"]
