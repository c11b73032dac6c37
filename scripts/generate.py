"""Build (or load) a model, run a forward pass and a greedy continuation of a prompt, and say what happened.

With no flags: the tiny preset with random weights and the byte-level tokenizer, on whatever device JAX finds.
    python scripts/generate.py --prompt="Lightning attention is"
    python scripts/generate.py --checkpoint=/path/to/hf_folder --dtype=bfloat16
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from minimax_jax.checkpoint import from_pretrained
from minimax_jax.config import get_preset
from minimax_jax.data.byte_tokenizer import ByteTokenizer
from minimax_jax.infer.greedy import greedy_generate_uncached
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.params import count_params

_PRESET = flags.DEFINE_string("preset", "tiny", "model preset used when --checkpoint is not given")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "folder with config.json and safetensors (HF layout)")
_PROMPT = flags.DEFINE_string("prompt", "MiniMax-01 mixes lightning and softmax attention.", "prompt text")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 24, "tokens to generate greedily")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and weight dtype")
_SEED = flags.DEFINE_integer("seed", 0, "init seed for a preset's random weights")


def main(argv: list[str]) -> None:
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    if _CHECKPOINT.value:
        model = from_pretrained(_CHECKPOINT.value, dtype=dtype)
        source = _CHECKPOINT.value
    else:
        model = MiniMaxForCausalLM(get_preset(_PRESET.value), dtype=dtype, rngs=nnx.Rngs(_SEED.value))
        source = f"preset {_PRESET.value!r}, random weights (seed {_SEED.value})"
    config = model.config
    tokenizer = ByteTokenizer()
    if config.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"the byte tokenizer needs vocab_size >= 256, the model has {config.vocab_size}")
    counts = count_params(config)
    pattern = "".join("L" if t == 0 else "S" for t in config.group_pattern)
    print(f"model: {source}; {jax.devices()[0].platform} backend, {dtype.name}")
    print(f"  {config.num_hidden_layers} layers scanned as {config.num_layer_groups} x [{pattern}] "
          f"(L lightning, S softmax), hidden {config.hidden_size}, {config.num_attention_heads} heads x "
          f"{config.head_dim}, {config.num_local_experts} experts top-{config.num_experts_per_tok}")
    print(f"  parameters: {counts.total:,} total, {counts.active:,} active per token (w/o embeddings)")

    prompt = jnp.asarray(tokenizer.encode(_PROMPT.value))[None, :]
    forward = nnx.jit(lambda m, ids: m(ids))
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(model, prompt))
    elapsed = time.perf_counter() - start
    probs = np.asarray(jax.nn.softmax(logits[0, -1]))
    top = np.argsort(probs)[::-1][:5]
    print(f"forward: {prompt.shape[1]} prompt tokens -> logits {tuple(logits.shape)} {logits.dtype} "
          f"in {elapsed:.2f}s (compile included); finite: {bool(jnp.isfinite(logits).all())}")
    print("  next-token top-5: " + ", ".join(f"{tokenizer.decode([i])!r} {probs[i]:.3f}" for i in top))

    start = time.perf_counter()
    ids = jax.block_until_ready(greedy_generate_uncached(model, prompt, _MAX_NEW.value))
    elapsed = time.perf_counter() - start
    continuation = np.asarray(ids[0, prompt.shape[1]:])
    print(f"greedy: {_MAX_NEW.value} new tokens in {elapsed:.2f}s (compile included)")
    print(f"  prompt:       {_PROMPT.value!r}")
    print(f"  continuation: {tokenizer.decode(continuation)!r} (ids {continuation.tolist()})")


if __name__ == "__main__":
    app.run(main)
