"""Softmax attention layers of MiniMax-Text-01: GQA, partial RoPE, causal, optional packed-sequence segments."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model.explicit_sharding import row_parallel_out_sharding
from minimax_jax.model.norms_rope import apply_partial_rope
from minimax_jax.model.params_init import normal_param
from pallas_kernels import document_attention
from pallas_kernels.lightning.ops import segment_index  # one segment convention for both mixers


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Boolean ``[batch, 1, seq, seq]`` mask: True where query and key lie in the same segment (contiguous run)."""
    index = segment_index(segment_ids)
    same = index[:, :, None] == index[:, None, :]
    return same[:, None, :, :]


def causal_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
                         implementation: str | None = None) -> jax.Array:
    """Causal softmax attention with scale ``1/sqrt(head_dim)`` and the softmax in fp32.

    Args:
      q: ``[batch, seq, heads, head_dim]``; k, v: ``[batch, seq, kv_heads, head_dim]`` (not repeated: query head h
        reads kv head ``h // (heads / kv_heads)``).
      segment_ids: optional int ``[batch, seq]``; a token attends only to earlier tokens of its own segment (a
        contiguous run of equal ids).
      implementation: ``xla`` | ``cudnn`` | ``tokamax`` | None (see ``default_implementation``). ``tokamax`` is
        tokamax's flash attention (``tokamax_gqa_attention``: Mosaic-GPU or Triton kernels on GPU, its XLA
        reference elsewhere).
    """
    if implementation is None:
        implementation = default_implementation(q.dtype, has_segments=segment_ids is not None)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}, expected one of {IMPLEMENTATIONS}")
    if implementation == "tokamax":
        return tokamax_gqa_attention(q, k, v, segment_ids=segment_ids)
    mask = None if segment_ids is None else segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]), is_causal=True,
                                        implementation=implementation)


IMPLEMENTATIONS = ("xla", "cudnn", "tokamax")


def default_implementation(dtype, *, has_segments: bool) -> str:
    """On GPU for 16-bit inputs: cuDNN's fused causal attention without segments, tokamax's flash kernels with
    segments (cuDNN would turn the segment mask into a dense bias; on an H100 at 4 x 8K tokamax's Mosaic-GPU
    forward+backward was 1.7x jax's Pallas-Triton flash attention, docs/benchmarks.md). XLA otherwise (fp32,
    CPU, TPU).
    ``jax.nn.dot_product_attention``'s own default is always XLA, which materializes fp32 score matrices."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype).itemsize != 2:
        return "xla"
    return "tokamax" if has_segments else "cudnn"


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """int32 ``[batch, seq]``: the position where each token's segment (contiguous run of equal ids) begins."""
    seq_len = segment_ids.shape[1]
    begins = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(begins, jnp.arange(seq_len, dtype=jnp.int32), 0), axis=1)


TOKAMAX_KERNELS = ("mosaic_gpu", "triton", "xla")


def tokamax_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
                          kernels: tuple[str, ...] | None = None) -> jax.Array:
    """``causal_gqa_attention`` through tokamax's flash attention (fused forward and backward kernels).

    Segments become a per-query ``k_start`` (a query sees the keys from its segment's first position up to
    itself): the same mask as ``segment_mask`` & causal, since segments are contiguous runs. The forward kernel skips
    key blocks outside that range; so does the backward pass on Hopper (``_flash_attention``), where tokamax's
    backward kernels would only mask them. Both read k, v per kv head (no repeat).
    The output and softmax statistics are kept for the backward pass even under ``jax.checkpoint``
    (``_flash_attention``).

    Args:
      kernels: tokamax implementations to try in order (``TOKAMAX_KERNELS``; one that does not take the inputs or
        the device is skipped). None: ``mosaic_gpu`` (sm80+), then ``triton`` on GPU; ``xla`` (tokamax's
        reference path) elsewhere.
    """
    if kernels is None:
        kernels = ("mosaic_gpu", "triton") if jax.default_backend() == "gpu" else ("xla",)
    unknown = [name for name in kernels if name not in TOKAMAX_KERNELS]
    if unknown or not kernels:
        raise ValueError(f"tokamax attention kernels must be among {TOKAMAX_KERNELS}, got {kernels}")
    k_start = None if segment_ids is None else segment_starts(segment_ids)[:, None, :]
    errors = []
    for name in kernels:
        try:
            return _flash_attention(name, q, k, v, k_start, 1.0 / math.sqrt(q.shape[-1]))
        except NotImplementedError as error:
            errors.append(f"{name}: {error}")
    raise NotImplementedError(f"no tokamax attention kernel takes these inputs: {'; '.join(errors)}")


def _tokamax_op(name: str):
    """tokamax's attention op ``name``, with an explicit vjp op (its XLA reference has none by default)."""
    from tokamax._src.ops.attention import api as tokamax_api  # per-query k_start is not in tokamax's public API
    from tokamax._src.ops.attention import base as tokamax_base

    if name == "xla":
        return tokamax_base.DotProductAttention(vjp=tokamax_base.DotProductAttentionVjp())
    return tokamax_api.IMPLEMENTATIONS[name]


def _causal_mask(k_start: jax.Array | None):
    from tokamax._src.ops.attention import base as tokamax_base

    return tokamax_base.Mask(k_start=k_start, is_causal=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _flash_attention(kernel: str, q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array | None,
                     logits_scale: float) -> jax.Array:
    """tokamax's attention op ``kernel``, whose forward kernel runs once per training step.

    tokamax's own ``custom_vjp`` asks ``jax.checkpoint`` to recompute its forward pass in the backward pass
    (``optimize_remat``), which reran the forward kernel in every layer's backward pass (1.2 ms per layer on an
    H100 at 8 x 8K). Here the output and the softmax statistics are ordinary residuals, which remat keeps:
    ``[batch, seq, heads]`` fp32 twice plus the output. ``precision=None`` makes its dots follow
    ``jax.default_matmul_precision`` like the rest of the model (tokamax's default pins TF32 for fp32 on GPUs).

    With segments on Hopper the backward pass is ``pallas_kernels.document_attention`` (it skips the key blocks
    outside each query's document, which tokamax's backward kernels only mask).
    """
    return _tokamax_op(kernel)(q, k, v, mask=_causal_mask(k_start), logits_scale=logits_scale, precision=None)


def _flash_attention_fwd(kernel, q, k, v, k_start, logits_scale):
    out, statistics = _tokamax_op(kernel)(q, k, v, mask=_causal_mask(k_start), logits_scale=logits_scale,
                                          precision=None, return_residuals=True)
    return out, (q, k, v, k_start, out, statistics)


def _flash_attention_bwd(kernel, logits_scale, residuals, d_out):
    q, k, v, k_start, out, statistics = residuals
    if kernel == "mosaic_gpu" and k_start is not None and _document_backward_fits(q, k):
        row_max, row_sum = statistics
        grads = document_attention.document_attention_backward(q, k, v, out, d_out, row_max, row_sum, k_start[:, 0],
                                                               logits_scale=logits_scale)
        return (*grads, None)
    op = _tokamax_op(kernel)
    arguments = dict(op.bind(q, k, v, mask=_causal_mask(k_start), logits_scale=logits_scale, precision=None).kwargs)
    arguments.pop("return_residuals")  # the vjp op takes the forward's canonical keyword arguments, not this one
    grads = op.vjp(statistics, out, d_out, q, k, v, **arguments)
    return grads["q"], grads["k"], grads["v"], None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def _document_backward_fits(q: jax.Array, k: jax.Array) -> bool:
    """Whether ``document_attention``'s Hopper kernels take these inputs on the target GPU (the abstract mesh's
    device when lowering ahead of time)."""
    from tokamax._src import gpu_utils

    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None:
        hopper = gpu_utils.is_sm90()
    else:
        hopper = any(name in device.device_kind for name in ("H100", "H200", "H800"))
    return hopper and document_attention.fits(q, k)


def cached_attention_mask(query_slots: jax.Array, key_slots: jax.Array, key_start: jax.Array) -> jax.Array:
    """Bool ``[batch, 1, 1, chunk, keys]``: key slot j is visible to the query in slot p of row b iff
    ``key_start[b] <= j <= p``; a padding query (p < key_start[b]) sees only itself, so no row of scores is empty."""
    p, j = query_slots[None, :, None], key_slots[None, None, :]
    visible = ((j >= key_start[:, None, None]) & (j <= p)) | (j == p)
    return visible[:, None, None]


def cached_gqa_attention(q: jax.Array, keys: jax.Array, values: jax.Array, *, query_slots: jax.Array,
                         key_start: jax.Array, kv_block: int | None = None) -> jax.Array:
    """Softmax attention of a chunk of queries to a preallocated KV cache, scale ``1/sqrt(head_dim)``, fp32 softmax.

    Args:
      q: ``[batch, chunk, heads, head_dim]``; keys, values: ``[batch, capacity, kv_heads, head_dim]`` (GQA: query
        head h reads kv head ``h // (heads / kv_heads)``).
      query_slots: int32 ``[chunk]`` cache slot of each query (shared by the rows); key_start: int32 ``[batch]``.
      kv_block: None scores all slots at once (decode). An int runs an online softmax over key blocks of that
        length, visiting only blocks that hold visible keys, so a long prefill chunk needs ``chunk x kv_block``
        scores, not ``chunk x capacity``. ``capacity`` must be a multiple of ``kv_block``.
    """
    batch, chunk, heads, head_dim = q.shape
    capacity, kv_heads = keys.shape[1], keys.shape[2]
    qg = q.reshape(batch, chunk, kv_heads, heads // kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)

    def scores_of(key_block: jax.Array) -> jax.Array:  # fp32 [batch, kv_heads, group, chunk, block]
        return jnp.einsum("bckgd,bjkd->bkgcj", qg, key_block, preferred_element_type=jnp.float32) * scale

    if kv_block is None or kv_block >= capacity:
        mask = cached_attention_mask(query_slots, jnp.arange(capacity, dtype=jnp.int32), key_start)
        probs = jax.nn.softmax(jnp.where(mask, scores_of(keys), -jnp.inf), axis=-1).astype(values.dtype)
        o = jnp.einsum("bkgcj,bjkd->bckgd", probs, values)
        return o.reshape(batch, chunk, heads, head_dim)
    if capacity % kv_block:
        raise ValueError(f"cache capacity {capacity} is not a multiple of kv_block {kv_block}")

    def visit(block, carry):
        running_max, denominator, acc = carry
        start = block * kv_block
        key_block = jax.lax.dynamic_slice_in_dim(keys, start, kv_block, axis=1)
        value_block = jax.lax.dynamic_slice_in_dim(values, start, kv_block, axis=1)
        mask = cached_attention_mask(query_slots, start + jnp.arange(kv_block, dtype=jnp.int32), key_start)
        scores = jnp.where(mask, scores_of(key_block), -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(axis=-1, keepdims=True))
        probs = jnp.exp(scores - new_max)
        correction = jnp.exp(running_max - new_max)
        denominator = denominator * correction + probs.sum(axis=-1, keepdims=True)
        acc = acc * correction + jnp.einsum("bkgcj,bjkd->bkgcd", probs.astype(values.dtype), value_block,
                                            preferred_element_type=jnp.float32)
        return new_max, denominator, acc

    stats_shape = (batch, kv_heads, heads // kv_heads, chunk, 1)
    init = (jnp.full(stats_shape, -1e30, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(stats_shape[:-1] + (head_dim,), jnp.float32))
    first = jnp.minimum(jnp.min(key_start), jnp.min(query_slots)) // kv_block  # every query sees its own slot
    last = jnp.max(query_slots) // kv_block + 1
    _, denominator, acc = jax.lax.fori_loop(first, last, visit, init)
    o = (acc / denominator).astype(values.dtype)  # [batch, kv_heads, group, chunk, head_dim]
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(batch, chunk, heads, head_dim)


class SoftmaxAttention(nnx.Module):
    """The softmax mixer (attention type 1): q/k/v projections, partial RoPE on q and k, GQA, output projection."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)
        self.rotary_dim = config.rotary_dim
        self.rope_theta = config.rope_theta
        self.dtype = dtype
        self.q_proj = normal_param(rngs, (hidden, heads, head_dim), param_dtype, ("embed", "heads", "head_dim"))
        self.k_proj = normal_param(rngs, (hidden, kv_heads, head_dim), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.v_proj = normal_param(rngs, (hidden, kv_heads, head_dim), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.o_proj = normal_param(rngs, (heads, head_dim, hidden), param_dtype, ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        q, k, v = self._project_qkv(x, positions)
        o = causal_gqa_attention(q, k, v, segment_ids=segment_ids)
        return jnp.einsum("bthk,hkd->btd", o, self.o_proj[...].astype(self.dtype),
                          out_sharding=row_parallel_out_sharding(o))

    def _project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v ``[batch, seq, (kv_)heads, head_dim]`` with partial RoPE at ``positions`` on q and k."""
        x = x.astype(self.dtype)
        q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(self.dtype))
        k = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(self.dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(self.dtype))
        q = apply_partial_rope(q, positions, rotary_dim=self.rotary_dim, theta=self.rope_theta)
        k = apply_partial_rope(k, positions, rotary_dim=self.rotary_dim, theta=self.rope_theta)
        return q, k, v

    def call_with_cache(self, x: jax.Array, *, positions: jax.Array, keys: jax.Array, values: jax.Array,
                        cache_index: jax.Array, key_start: jax.Array,
                        kv_block: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Cached inference on a chunk ``x`` ``[batch, chunk, hidden]`` occupying cache slots ``cache_index + i``.

        Writes the chunk's k, v into ``keys``/``values`` ``[batch, capacity, kv_heads, head_dim]`` (one slot index
        shared by all rows), then attends to every slot in ``[key_start[b], own slot]``. Returns the output and the
        updated caches. ``positions`` are the RoPE positions (0 at each row's first real token).
        """
        q, k, v = self._project_qkv(x, positions)
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, cache_index, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, cache_index, 0, 0))
        query_slots = cache_index + jnp.arange(x.shape[1], dtype=jnp.int32)
        o = cached_gqa_attention(q, keys, values, query_slots=query_slots, key_start=key_start, kv_block=kv_block)
        return jnp.einsum("bthk,hkd->btd", o, self.o_proj[...].astype(self.dtype),
                          out_sharding=row_parallel_out_sharding(o)), keys, values
