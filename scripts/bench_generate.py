"""Long-context generation benchmark on one GPU: our cached prefill/decode vs transformers' PyTorch MiniMax.

One invocation prints one markdown table. Phases, each in its own process so that JAX and PyTorch never hold the
GPU at the same time: (1) export: a random-weight model of the preset (RoPE over the whole head, as transformers
computes it, so both sides run the same math) is written as a transformers-format folder (config.json +
safetensors with the official tensor names); (2) transformers: ``MiniMaxForCausalLM.from_pretrained`` of that folder
in bf16 on cuda, ``generate`` timed with 1 and with N+1 new tokens at each --hf_contexts after one untimed run
(decode ms/token = difference / N); (3) ours: ``from_pretrained`` of the same folder in bf16, prefill timed at
each --contexts (after a compile warm-up), then N greedy decode steps, cache bytes and peak device memory.

    python scripts/bench_generate.py                                   # small preset, 32K .. 1M, H100/H200
    python scripts/bench_generate.py --preset=tiny --contexts=64,128 --hf_contexts=64 --decode_tokens=4 \
        --prefill_chunk=32 --kv_block=32 --hf_python=.ref-venv/bin/python              # CPU smoke test

The transformers phase needs only torch, transformers, safetensors and numpy (``--hf_python`` may be another venv).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HF_PHASE = "hf-phase"  # argv[1] of the transformers phase (it must not import jax or absl)


def _hf_phase(job_path: str) -> None:
    """Times transformers' generate; writes ``hf_results.json`` next to the job file."""
    import torch
    from transformers import MiniMaxForCausalLM

    job = json.loads(Path(job_path).read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MiniMaxForCausalLM.from_pretrained(job["folder"], dtype=torch.bfloat16).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed_generate(ids: np.ndarray, new: int) -> float:
        tensor = torch.as_tensor(ids[None], device=device)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(tensor, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    probe = np.load(job["probe"])
    with torch.inference_mode():
        probe_logits = model(torch.as_tensor(probe[None], device=device)).logits[0, -1].float().cpu().numpy()
    np.save(Path(job_path).parent / "hf_probe_logits.npy", probe_logits)
    timed_generate(probe, 2)  # warm-up (cuda init, kernel selection)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "contexts": {}}
    for context in job["contexts"]:
        ids = np.load(job["prompt"])[:context]
        timed_generate(ids, 1)  # warm-up at this length (allocator, kernel choice)
        prefill = timed_generate(ids, 1)
        total = timed_generate(ids, job["decode_tokens"] + 1)
        results["contexts"][str(context)] = {"prefill_s": prefill,
                                             "decode_ms": 1e3 * (total - prefill) / job["decode_tokens"]}
        print(f"transformers {context}: prefill {prefill:.2f}s, decode "
              f"{results['contexts'][str(context)]['decode_ms']:.2f} ms/token", flush=True)
    (Path(job_path).parent / "hf_results.json").write_text(json.dumps(results))


if __name__ == "__main__" and sys.argv[1:2] == [HF_PHASE]:
    _hf_phase(sys.argv[2])
    sys.exit(0)

from absl import app, flags  # noqa: E402  (the transformers phase above runs without absl or jax)

_PRESET = flags.DEFINE_string("preset", "small", "model preset (random weights)")
_CONTEXTS = flags.DEFINE_list("contexts", ["32768", "131072", "524288", "1048576"], "our prefill lengths")
_HF_CONTEXTS = flags.DEFINE_list("hf_contexts", ["32768"], "transformers' prefill lengths (empty: skip it)")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 32, "decode steps timed per context")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 16384, "our prefill chunk")
_KV_BLOCK = flags.DEFINE_integer("kv_block", 2048, "our softmax key block during prefill")
_HF_PYTHON = flags.DEFINE_string("hf_python", sys.executable, "interpreter with torch + transformers")
_SEED = flags.DEFINE_integer("seed", 0, "weights and prompt seed")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the exported model goes (default: a temporary folder)")
_PHASE = flags.DEFINE_enum("phase", "all", ["all", "export"], "internal: 'export' runs phase 1 only")

PROBE_TOKENS = 64


def _bench_config():
    from minimax_jax.config import get_preset

    config = get_preset(_PRESET.value)
    longest = max(int(c) for c in _CONTEXTS.value + _HF_CONTEXTS.value)
    return config.replace(rotary_dim=config.head_dim,  # transformers rotates the whole head
                          max_position_embeddings=max(config.max_position_embeddings,
                                                      longest + _DECODE_TOKENS.value + 16))


def _transformers_config(config) -> dict:
    """config.json in transformers' MiniMaxConfig format for ``config`` (full-head RoPE)."""
    return {
        "architectures": ["MiniMaxForCausalLM"], "model_type": "minimax", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "num_local_experts": config.num_local_experts, "num_experts_per_tok": config.num_experts_per_tok,
        "layer_types": ["linear_attention" if t == 0 else "full_attention" for t in config.attn_type_list],
        "block_size": 256, "rms_norm_eps": config.rms_norm_eps,
        "full_attn_alpha_factor": config.layernorm_full_attention_alpha,
        "full_attn_beta_factor": config.layernorm_full_attention_beta,
        "linear_attn_alpha_factor": config.layernorm_linear_attention_alpha,
        "linear_attn_beta_factor": config.layernorm_linear_attention_beta,
        "mlp_alpha_factor": config.layernorm_mlp_alpha, "mlp_beta_factor": config.layernorm_mlp_beta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings, "tie_word_embeddings": False,
        "router_jitter_noise": 0.0, "hidden_act": "silu", "dtype": "bfloat16",
    }


def _export(folder: Path) -> None:
    """Phase 1: random bf16 weights of the preset, written with official names, plus the prompt and the probe."""
    import jax.numpy as jnp
    import safetensors.numpy
    from flax import nnx

    from minimax_jax import to_official_tensors
    from minimax_jax.model.transformer import MiniMaxForCausalLM

    config = _bench_config()
    folder.mkdir(parents=True, exist_ok=True)
    model = MiniMaxForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(_SEED.value))
    safetensors.numpy.save_file(to_official_tensors(model), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(_transformers_config(config), indent=1))
    rng = np.random.default_rng(_SEED.value)
    longest = max(int(c) for c in _CONTEXTS.value + _HF_CONTEXTS.value)
    np.save(folder / "prompt.npy", rng.integers(0, config.vocab_size, longest).astype(np.int32))
    np.save(folder / "probe.npy", rng.integers(0, config.vocab_size, PROBE_TOKENS).astype(np.int32))


def _run(command: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, **env})


def _our_phase(folder: Path) -> dict:
    """Phase 3: our prefill and decode at every context."""
    import jax
    import jax.numpy as jnp

    from minimax_jax import from_pretrained
    from minimax_jax.infer import Generator
    from minimax_jax.model.cache import cache_bytes

    model = from_pretrained(folder, dtype=jnp.bfloat16)
    contexts = [int(c) for c in _CONTEXTS.value]
    extra = _DECODE_TOKENS.value + 2  # two untimed decode steps compile the step
    generator = Generator(model, max_length=max(contexts) + extra, prefill_chunk=_PREFILL_CHUNK.value,
                          kv_block=_KV_BLOCK.value)
    _, probe_logits = generator.prefill([np.load(folder / "probe.npy").tolist()])
    results = {"device": str(jax.devices()[0].device_kind), "probe_logits": np.asarray(probe_logits[0]),
               "contexts": {}}
    prompt = np.load(folder / "prompt.npy")
    for context in contexts:
        ids = prompt[:context].tolist()
        warm = min(context, context % _PREFILL_CHUNK.value + _PREFILL_CHUNK.value)  # compiles every chunk shape
        jax.block_until_ready(generator.prefill([ids[:warm]], extra_slots=context + extra - warm))
        start = time.perf_counter()
        cache, logits = jax.block_until_ready(generator.prefill([ids], extra_slots=extra))
        prefill = time.perf_counter() - start
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        for step in range(2):
            tokens, _, cache = generator.decode(cache, tokens, step)
        jax.block_until_ready(tokens)
        start = time.perf_counter()
        for step in range(2, extra):
            tokens, _, cache = generator.decode(cache, tokens, step)
        jax.block_until_ready((tokens, cache))
        decode_ms = 1e3 * (time.perf_counter() - start) / _DECODE_TOKENS.value
        stats = jax.devices()[0].memory_stats() or {}
        results["contexts"][context] = {"prefill_s": prefill, "decode_ms": decode_ms, **cache_bytes(cache),
                                        "peak_bytes": stats.get("peak_bytes_in_use")}
        print(f"ours {context}: prefill {prefill:.2f}s, decode {decode_ms:.2f} ms/token", flush=True)
        del cache
    return results


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def _table(ours: dict, hf: dict | None, config) -> str:
    lines = [f"Preset `{_PRESET.value}` ({config.num_hidden_layers} layers, "
             f"{config.attn_type_list.count(1)} softmax), bf16, batch 1, random weights, full-head RoPE on both sides; "
             f"ours on {ours['device']}, transformers on {hf['device'] if hf else 'n/a'}. Prefill chunk "
             f"{_PREFILL_CHUNK.value}, key block {_KV_BLOCK.value}, decode timed over {_DECODE_TOKENS.value} tokens.",
             "",
             "| context | our prefill (s) | our prefill (tok/s) | our decode (ms/token) | lightning state (MiB) | "
             "KV cache (MiB) | peak device memory (MiB) | transformers prefill (s) | transformers decode "
             "(ms/token) | prefill speedup | decode speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for context, row in ours["contexts"].items():
        theirs = (hf or {}).get("contexts", {}).get(str(context))
        hf_cells = (f"{theirs['prefill_s']:.2f} | {theirs['decode_ms']:.2f} | "
                    f"{theirs['prefill_s'] / row['prefill_s']:.1f}x | {theirs['decode_ms'] / row['decode_ms']:.1f}x"
                    if theirs else "- | - | - | -")
        lines.append(f"| {context:,} | {row['prefill_s']:.2f} | {context / row['prefill_s']:,.0f} | "
                     f"{row['decode_ms']:.2f} | {_mib(row['lightning_state'])} | {_mib(row['kv'])} | "
                     f"{_mib(row['peak_bytes'])} | {hf_cells} |")
    for context, theirs in (hf or {}).get("contexts", {}).items():
        if int(context) not in ours["contexts"]:
            lines.append(f"| {int(context):,} | - | - | - | - | - | - | {theirs['prefill_s']:.2f} | "
                         f"{theirs['decode_ms']:.2f} | - | - |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    folder = Path(_WORKDIR.value or tempfile.mkdtemp(prefix="bench_generate_"))
    if _PHASE.value == "export":
        _export(folder)
        return
    script = str(Path(__file__).resolve())
    flag_args = [f"--preset={_PRESET.value}", f"--contexts={','.join(_CONTEXTS.value)}",
                 f"--hf_contexts={','.join(_HF_CONTEXTS.value)}", f"--decode_tokens={_DECODE_TOKENS.value}",
                 f"--seed={_SEED.value}", f"--workdir={folder}"]
    _run([sys.executable, script, "--phase=export", *flag_args], {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    hf = None
    if _HF_CONTEXTS.value:
        job = {"folder": str(folder), "prompt": str(folder / "prompt.npy"), "probe": str(folder / "probe.npy"),
               "contexts": [int(c) for c in _HF_CONTEXTS.value], "decode_tokens": _DECODE_TOKENS.value}
        (folder / "hf_job.json").write_text(json.dumps(job))
        _run([_HF_PYTHON.value, script, HF_PHASE, str(folder / "hf_job.json")], {})
        hf = json.loads((folder / "hf_results.json").read_text())
    ours = _our_phase(folder)
    print()
    print(_table(ours, hf, _bench_config()))
    if hf is not None:
        theirs = np.load(folder / "hf_probe_logits.npy")
        diff = float(np.max(np.abs(ours["probe_logits"] - theirs)))
        print(f"\nSame weights check: last-token logits of a {PROBE_TOKENS}-token prompt, ours vs transformers (both "
              f"bf16): max |difference| {diff:.3g} (max |logit| {float(np.max(np.abs(theirs))):.3g}).")


if __name__ == "__main__":
    app.run(main)
