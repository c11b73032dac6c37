"""Build (or load) a model, run a forward pass, then generate a continuation with the cache, streaming tokens.

With no flags: the tiny preset with random weights and the byte-level tokenizer, greedy, on whatever device JAX
finds. Checkpoints: a Hugging Face folder (config.json + safetensors), or the trainer's orbax checkpoints (a
workdir, its checkpoints folder or a step folder) together with the run's config file or a preset.
    python scripts/generate.py --prompt="Lightning attention is"
    python scripts/generate.py --checkpoint=/path/to/hf_folder --dtype=bfloat16 --tokenizer=/path/tokenizer.json
    python scripts/generate.py --checkpoint=/runs/tiny --train_config=configs/tiny.py --temperature=0.8 --top_p=0.9
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from minimax_jax.config import get_preset
from minimax_jax.data.tokenizer import load_tokenizer
from minimax_jax.infer import Generator, PromptTooLongError, SamplingConfig
from minimax_jax.infer.loading import load_model
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.params import count_params

_PRESET = flags.DEFINE_string("preset", "tiny", "model preset: random weights without --checkpoint, the model "
                              "config of an orbax --checkpoint without --train_config")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face folder, or orbax workdir/checkpoints/step")
_TRAIN_CONFIG = flags.DEFINE_string("train_config", None, "the training run's config file (orbax checkpoints)")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a tokenizer.json (or its folder)")
_PROMPT = flags.DEFINE_string("prompt", "MiniMax-01 mixes lightning and softmax attention.", "prompt text")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 24, "tokens to generate at most")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "prompt + new tokens allowed (default: the model's max)")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 2048, "prompt tokens per prefill step")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1: all)")
_SEED = flags.DEFINE_integer("seed", 0, "init seed of a preset's random weights and the sampling seed")
_STOP = flags.DEFINE_list("stop_tokens", [], "token ids that end generation (default: the tokenizer's EOS)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and weight dtype")
_CHECK = flags.DEFINE_bool("check_uncached", False, "also check the greedy tokens against the argmax of one "
                           "uncached forward pass over prompt + continuation (greedy only)")


def _build_model(dtype) -> tuple[MiniMaxForCausalLM, str]:
    if not _CHECKPOINT.value:
        model = MiniMaxForCausalLM(get_preset(_PRESET.value), dtype=dtype, rngs=nnx.Rngs(_SEED.value))
        return model, f"preset {_PRESET.value!r}, random weights (seed {_SEED.value})"
    if _TRAIN_CONFIG.value:
        from minimax_jax.train.config import load_config_file

        orbax_config = load_config_file(_TRAIN_CONFIG.value).model
    else:
        orbax_config = get_preset(_PRESET.value)
    return load_model(_CHECKPOINT.value, dtype=dtype, orbax_config=orbax_config)


def _describe(model: MiniMaxForCausalLM, source: str, dtype) -> None:
    config = model.config
    counts = count_params(config)
    pattern = "".join("L" if t == 0 else "S" for t in config.group_pattern)
    print(f"model: {source}; {jax.devices()[0].platform} backend, {jnp.dtype(dtype).name}")
    print(f"  {config.num_hidden_layers} layers scanned as {config.num_layer_groups} x [{pattern}] "
          f"(L lightning, S softmax), hidden {config.hidden_size}, {config.num_attention_heads} heads x "
          f"{config.head_dim}, {config.num_local_experts} experts top-{config.num_experts_per_tok}")
    print(f"  parameters: {counts.total:,} total, {counts.active:,} active per token (w/o embeddings)")


class _Streamer:
    """Prints row 0's text as tokens arrive (decoding the whole continuation, so multi-byte characters print whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, step: int, tokens: np.ndarray, emitted: np.ndarray) -> None:
        if not emitted[0]:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def main(argv: list[str]) -> None:
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    model, source = _build_model(dtype)
    config = model.config
    tokenizer = load_tokenizer(_TOKENIZER.value)
    if config.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                         f"{config.vocab_size}")
    _describe(model, source, dtype)

    prompt_ids = [int(i) for i in tokenizer.encode(_PROMPT.value)]
    prompt = jnp.asarray(prompt_ids, jnp.int32)[None, :]
    start = time.perf_counter()
    logits = jax.block_until_ready(nnx.jit(lambda m, ids: m(ids))(model, prompt))
    elapsed = time.perf_counter() - start
    probs = np.asarray(jax.nn.softmax(logits[0, -1]))
    top = np.argsort(probs)[::-1][:5]
    print(f"forward: {prompt.shape[1]} prompt tokens -> logits {tuple(logits.shape)} {logits.dtype} "
          f"in {elapsed:.2f}s (compile included); finite: {bool(jnp.isfinite(logits).all())}")
    print("  next-token top-5: " + ", ".join(f"{tokenizer.decode([i])!r} {probs[i]:.3f}" for i in top))

    sampling = SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                              seed=_SEED.value)
    stop = [int(t) for t in _STOP.value] or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    generator = Generator(model, max_length=_MAX_LENGTH.value, prefill_chunk=_PREFILL_CHUNK.value)
    mode = "greedy" if sampling.greedy else (f"temperature {sampling.temperature}, top-k {sampling.top_k}, "
                                             f"top-p {sampling.top_p}, seed {sampling.seed}")
    print(f"generate ({mode}; cached: chunked prefill + jitted decode; stop tokens {stop or 'none'}):")
    print(f"  {_PROMPT.value}", end="", flush=True)
    streamer = _Streamer(tokenizer)
    start = time.perf_counter()
    try:
        result = generator.generate([prompt_ids], max_new_tokens=_MAX_NEW.value, stop_tokens=stop,
                                    sampling=sampling, on_tokens=streamer)
    except PromptTooLongError as e:
        raise SystemExit(f"\nerror: {e}") from None
    elapsed = time.perf_counter() - start
    continuation = result.row(0)
    print(f"\n  {len(continuation)} new tokens in {elapsed:.2f}s (compile included); ids {continuation}")

    if _CHECK.value and sampling.greedy and continuation:
        print(f"uncached forward agrees: {_uncached_greedy(model, prompt_ids, continuation) == continuation}")


def _uncached_greedy(model: MiniMaxForCausalLM, prompt_ids: list[int], continuation: list[int]) -> list[int]:
    """The argmax after each of prompt + continuation[:-1] in one causal forward pass: equal to ``continuation``
    exactly when a cache-free greedy loop would have produced it."""
    ids = jnp.asarray(prompt_ids + continuation[:-1], jnp.int32)[None, :]
    logits = nnx.jit(lambda m, x: m(x))(model, ids)
    return np.asarray(jnp.argmax(logits[0, len(prompt_ids) - 1:], axis=-1)).tolist()


if __name__ == "__main__":
    app.run(main)
