"""Batched generation with a cache: chunked prefill, a jitted decode step with the cache donated, stop rules.

``Generator(model, max_length=...)`` prepares the model once; ``generate(prompts, max_new_tokens=...)`` pads the
prompts on the left, prefills them in chunks, then decodes token by token (a Python loop over one compiled step,
so tokens can be streamed to a callback as they come).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from minimax_jax.infer.forward import InferenceGraph, InferenceWeights, forward_chunk, split_for_inference
from minimax_jax.infer.sampling import SamplingConfig, sample_tokens
from minimax_jax.model.cache import GenerationCache, create_cache
from minimax_jax.model.transformer import MiniMaxForCausalLM

GREEDY = SamplingConfig()
PAD_ID = 0  # fills left padding and the tokens after a row stopped; never seen by the model's real tokens

# on_tokens(step, tokens [batch], emitted [batch]): the tokens of decode step ``step`` (0 = the token after the
# prompt); ``emitted[b]`` is False for rows that had already stopped.
TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]


class PromptTooLongError(ValueError):
    """A prompt plus its new tokens does not fit the generator's configured maximum length."""


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """``tokens`` int32 ``[batch, max_new]``: row b's new tokens are ``tokens[b, :lengths[b]]`` (a stop token that
    ended the row included), the rest is ``PAD_ID``."""

    tokens: np.ndarray
    lengths: np.ndarray

    def row(self, b: int) -> list[int]:
        return self.tokens[b, : self.lengths[b]].tolist()


def chunk_sizes(length: int, chunk: int) -> list[int]:
    """Prefill chunk lengths for ``length`` slots: the remainder first, then full chunks (at most two shapes)."""
    remainder = length % chunk
    return ([remainder] if remainder else []) + [chunk] * (length // chunk)


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``[batch, longest]`` int32 ids with each prompt right-aligned, and each row's first real slot."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), PAD_ID, np.int32)
    starts = np.zeros(len(prompts), np.int32)
    for b, prompt in enumerate(prompts):
        starts[b] = longest - len(prompt)
        ids[b, starts[b]:] = np.asarray(prompt, np.int32)
    return ids, starts


def stopped_lengths(tokens: np.ndarray, max_new: np.ndarray, stop_tokens: Sequence[int]) -> np.ndarray:
    """Per row: the number of tokens kept, up to and including the first stop token, at most ``max_new[b]``."""
    steps = np.arange(tokens.shape[1])
    is_stop = np.isin(tokens, np.asarray(list(stop_tokens), np.int32)) & (steps[None] < max_new[:, None])
    first_stop = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, tokens.shape[1])
    return np.minimum(first_stop, max_new).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("graph", "kv_block", "all_logits"), donate_argnames=("cache",))
def _prefill_chunk(graph: InferenceGraph, weights: InferenceWeights, cache: GenerationCache, ids: jax.Array, *,
                   kv_block: int, all_logits: bool) -> tuple[jax.Array, GenerationCache]:
    return forward_chunk(graph, weights, cache, ids, kv_block=kv_block, all_logits=all_logits)


@functools.partial(jax.jit, static_argnames=("graph", "sampling"), donate_argnames=("cache",))
def _decode_step(graph: InferenceGraph, weights: InferenceWeights, cache: GenerationCache, tokens: jax.Array,
                 key: jax.Array, step: jax.Array, *, sampling: SamplingConfig
                 ) -> tuple[jax.Array, jax.Array, GenerationCache]:
    logits, cache = forward_chunk(graph, weights, cache, tokens[:, None], kv_block=None, all_logits=True)
    logits = logits[:, 0]
    return sample_tokens(logits, jax.random.fold_in(key, step), sampling), logits, cache


@functools.partial(jax.jit, static_argnames=("sampling",))
def _sample(logits: jax.Array, key: jax.Array, step: jax.Array, *, sampling: SamplingConfig) -> jax.Array:
    return sample_tokens(logits, jax.random.fold_in(key, step), sampling)


class Generator:
    """Cached generation for one model.

    Args:
      model: the causal LM (its arrays are used in place, the layer groups stay stacked; see ``infer/forward.py``).
      max_length: the most slots (longest prompt + new tokens) one call may use; default the model's
        ``max_position_embeddings``. Longer requests raise ``PromptTooLongError``.
      prefill_chunk: tokens per prefill step (bounds activation memory whatever the prompt length).
      kv_block: key block of the softmax layers' online softmax during prefill; cache capacities are rounded up
        to a multiple of it.
      fixed_capacity: always preallocate ``max_length`` slots (one compiled program for every request length,
        as a server wants) instead of just enough for the request.
      mesh: place the cache on this mesh like activations (call under ``jax.set_mesh(mesh)``).
    """

    def __init__(self, model: MiniMaxForCausalLM, *, max_length: int | None = None, prefill_chunk: int = 2048,
                 kv_block: int = 1024, fixed_capacity: bool = False, mesh: Mesh | None = None):
        if prefill_chunk < 1 or kv_block < 1:
            raise ValueError(f"prefill_chunk and kv_block must be >= 1, got {prefill_chunk}, {kv_block}")
        self.config = model.config
        self.max_length = max_length or self.config.max_position_embeddings
        if self.max_length > self.config.max_position_embeddings:
            raise ValueError(f"max_length {self.max_length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        self.prefill_chunk, self.kv_block, self.mesh = prefill_chunk, kv_block, mesh
        self.fixed_capacity = fixed_capacity
        self.graph, self.weights = split_for_inference(model)

    def prefill(self, prompts: Sequence[Sequence[int]], *, extra_slots: int = 0,
                all_logits: bool = False) -> tuple[GenerationCache, jax.Array]:
        """Prefills left-padded ``prompts`` in chunks into a cache with room for ``extra_slots`` more tokens.

        Returns the cache and fp32 logits: of the last prompt token ``[batch, vocab]``, or with ``all_logits`` of
        every slot ``[batch, longest_prompt, vocab]`` (padding slots hold meaningless values).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token sequences")
        ids, starts = left_pad(prompts)
        needed = ids.shape[1] + extra_slots
        if needed > self.max_length:
            raise PromptTooLongError(
                f"prompt of {ids.shape[1]} tokens + {extra_slots} new tokens = {needed} exceeds the configured "
                f"maximum length {self.max_length}")
        slots = self.max_length if self.fixed_capacity else needed
        capacity = -(-slots // self.kv_block) * self.kv_block
        cache = create_cache(self.config, starts, capacity, kv_dtype=self.graph.dtype, mesh=self.mesh)
        outputs, offset = [], 0
        for size in chunk_sizes(ids.shape[1], self.prefill_chunk):
            logits, cache = _prefill_chunk(self.graph, self.weights, cache, jnp.asarray(ids[:, offset:offset + size]),
                                           kv_block=self.kv_block, all_logits=all_logits)
            outputs.append(logits)
            offset += size
        return cache, (jnp.concatenate(outputs, axis=1) if all_logits else outputs[-1])

    def decode(self, cache: GenerationCache, tokens: jax.Array, step: int = 0,
               sampling: SamplingConfig = GREEDY) -> tuple[jax.Array, jax.Array, GenerationCache]:
        """One decode step (``cache`` is donated: use the returned one): next tokens, fp32 logits, new cache.

        The caller keeps the count of slots within ``cache.capacity`` (``prefill``'s ``extra_slots``); a write past
        the end would be clamped by ``dynamic_update_slice``, so it is not checked here (that would sync the host).
        """
        return _decode_step(self.graph, self.weights, cache, jnp.asarray(tokens, jnp.int32),
                            jax.random.key(sampling.seed), jnp.int32(step), sampling=sampling)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 stop_tokens: Sequence[int] = (), sampling: SamplingConfig = GREEDY,
                 on_tokens: TokenCallback | None = None) -> GenerationResult:
        """New tokens for each prompt: up to ``max_new_tokens`` (one int, or one per row) or a stop token.

        Rows run together; a finished row keeps being computed (its tokens are discarded) until all rows stop.
        The random key of step t is ``fold_in(key(seed), t)``.
        """
        batch = len(prompts)
        max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (batch,)).astype(np.int32)
        if (max_new < 0).any():
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new.tolist()}")
        steps = int(max_new.max()) if batch else 0
        if steps == 0:
            return GenerationResult(np.zeros((batch, 0), np.int32), np.zeros(batch, np.int32))
        cache, logits = self.prefill(prompts, extra_slots=steps)
        key = jax.random.key(sampling.seed)
        tokens = _sample(logits, key, jnp.int32(0), sampling=sampling)
        produced, stops = [tokens], np.asarray(list(stop_tokens), np.int32)
        finished = np.zeros(batch, bool)
        for step in range(steps):
            if on_tokens is not None or stops.size:  # host sync only when someone looks at the tokens
                current = np.asarray(tokens)
                if on_tokens is not None:
                    on_tokens(step, current, ~finished)
                finished |= np.isin(current, stops) | (max_new <= step + 1)
                if finished.all():
                    break
            if step + 1 == steps:
                break
            tokens, _, cache = _decode_step(self.graph, self.weights, cache, tokens, key, jnp.int32(step + 1),
                                            sampling=sampling)
            produced.append(tokens)
        history = np.stack([np.asarray(t) for t in produced], axis=1)
        lengths = stopped_lengths(history, max_new, stop_tokens)
        out = np.full((batch, steps), PAD_ID, np.int32)
        out[:, :history.shape[1]] = history
        out[np.arange(steps)[None] >= lengths[:, None]] = PAD_ID
        return GenerationResult(out, lengths)
