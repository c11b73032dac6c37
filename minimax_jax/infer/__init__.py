"""Cached inference: chunked prefill, a jitted decode step, sampling and batched generation.

Padding choice: prompts of different lengths are padded on the LEFT, and padding is kept out exactly:

* Every row writes the same cache slots (one shared write index), so a decode step updates the KV caches with one
  ``dynamic_update_slice`` and every row's prompt ends at the same slot.
* Lightning layers: k and v are zeroed at padding slots. The state starts at zero, so through the leading padding
  it stays exactly zero (a decay of zero is zero) and the row's first real token starts from the same zero state as
  the prompt alone. With right padding the state would instead be decayed by ``exp(-s)`` once per trailing pad.
* Softmax layers: a query attends to slots ``[starts[b], own slot]`` only, and RoPE positions count from 0 at the
  row's first real token (``slot - starts[b]``), so scores never see padding and positions equal the unpadded ones.
* MoE is per token (dropless), so padding tokens do not change real tokens' experts or outputs.

The results equal those of each prompt alone up to floating-point rounding (the blocked lightning op groups the
tokens into different blocks).
"""

from minimax_jax.infer.generator import GenerationResult, Generator, PromptTooLongError
from minimax_jax.infer.sampling import SamplingConfig, sample_tokens

__all__ = ["GenerationResult", "Generator", "PromptTooLongError", "SamplingConfig", "sample_tokens"]
