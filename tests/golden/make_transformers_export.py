"""Golden data: transformers 5.23 loading folders written by minimax-jax's exporter (scripts/convert_orbax_to_hf.py).

Run from the repository root with the reference venv (it calls the project venv for the JAX side):

    .ref-venv/bin/python tests/golden/make_transformers_export.py [--project_python .venv/bin/python]

For each golden variant (``hf_full_rope``, ``official_partial_rope``) the weights go through the project's two CLI
converters (safetensors -> orbax -> sharded safetensors); transformers then loads the exported folder with
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained`` (float32) and computes logits on the golden prompts.
``official_partial_rope`` is run with make_golden's ``semantics`` patch (partial RoPE with the rotary_dim the
exported config gives, official slopes), since transformers 5.23 ignores rotary_dim; it is also run unpatched, to
show that everything but RoPE is read right. Written under ``tests/golden/transformers_export/``:

``<variant>/config.json``   the config.json the exporter wrote (transformers read this file)
``<variant>/logits.npy``    float32 [2, 37, 256], transformers' logits from the exported folder
``load_report.json``        per variant: transformers' missing / unexpected / mismatched keys, the config values
                            transformers parsed, and the max |logit difference| against the project's model

The script fails unless transformers loads every exported tensor (missing: only the derived lightning buffers,
which it recomputes from the config), its in-memory weights equal the exported tensors (experts fused), and its
logits match the project's ``from_pretrained`` on the same folder to 1e-4.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import transformers
from make_golden import official_slopes, semantics
from transformers import AutoConfig, AutoModelForCausalLM

GOLDEN = Path(__file__).resolve().parent
ROOT = GOLDEN.parents[1]
OUT = GOLDEN / "transformers_export"
VARIANTS = ("hf_full_rope", "official_partial_rope")
SHARD_GB = "0.0003"  # 300 KB: several shards and an index for the 1.6 MB tiny model
TOLERANCE = 1e-4
DERIVED = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
# transformers' MiniMaxConfig attributes after loading the exported config.json, recorded so that CI (without torch)
# can read them back with ModelConfig's transformers-format reader and compare with the exported model's config.
PARSED_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                 "layer_types", "full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor",
                 "linear_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor", "rope_parameters", "rms_norm_eps",
                 "hidden_act", "tie_word_embeddings", "max_position_embeddings", "router_aux_loss_coef",
                 "router_jitter_noise", "bos_token_id", "eos_token_id")

OUR_LOGITS = """
import sys, jax, jax.numpy as jnp, numpy as np
from minimax_jax import from_pretrained
with jax.default_matmul_precision("highest"):
    logits = from_pretrained(sys.argv[1], dtype=jnp.float32)(jnp.asarray(np.load(sys.argv[2]), jnp.int32))
np.save(sys.argv[3], np.asarray(logits, np.float32))
"""


def project(python: str, *args: str) -> None:
    """Runs the project venv's Python in the repository root (raises on failure)."""
    subprocess.run([python, *args], cwd=ROOT, check=True)


def export(python: str, variant: str, work: Path) -> Path:
    """The golden variant through both CLI converters; returns the exported safetensors folder."""
    orbax, hf = work / f"{variant}_orbax", work / f"{variant}_hf"
    project(python, "scripts/convert_hf_to_orbax.py", f"--source={GOLDEN / variant}", f"--output={orbax}")
    project(python, "scripts/convert_orbax_to_hf.py", f"--source={orbax}", f"--output={hf}",
            f"--max_shard_size_gb={SHARD_GB}")
    return hf


def exported_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the exported folder (found through its index), upcast to float32 (exact from bf16)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        out.update({name: t.float().numpy() for name, t in safetensors.torch.load_file(folder / file).items()})
    assert set(out) == set(index), "index and shards disagree"
    return out


def check_weights(model, tensors: dict[str, np.ndarray]) -> None:
    """transformers' in-memory weights equal the exported tensors (``mlp`` for ``block_sparse_moe``, experts fused:
    ``gate_up_proj[e]`` = w1 rows then w3 rows, ``down_proj[e]`` = w2)."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    seen = set()
    for key, value in state.items():
        if key.endswith(DERIVED):
            continue
        if key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
            prefix = key.rsplit(".mlp.", 1)[0] + ".block_sparse_moe.experts"
            parts = ("w1", "w3") if key.endswith("gate_up_proj") else ("w2",)
            names = [[f"{prefix}.{e}.{p}.weight" for p in parts] for e in range(value.shape[0])]
            expected = np.stack([np.concatenate([tensors[n] for n in row]) for row in names])
            seen.update(n for row in names for n in row)
        else:  # transformers renames block_sparse_moe to mlp (the router gate too)
            name = key.replace(".mlp.", ".block_sparse_moe.")
            expected = tensors[name]
            seen.add(name)
        np.testing.assert_array_equal(value, expected, err_msg=key)
    assert seen == set(tensors), sorted(set(tensors) ^ seen)


def transformers_logits(folder: Path, ids: np.ndarray, patched: bool) -> tuple[np.ndarray, dict]:
    """transformers' float32 logits from the folder and what it reported about loading and the config."""
    config = AutoConfig.from_pretrained(folder)
    rotary_dim = round(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
    sem = {"rotary_dim": rotary_dim, "slope_fn": official_slopes} if patched else {}
    with semantics(**sem):
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        assert type(model).__name__ == "MiniMaxForCausalLM", type(model)
        check_weights(model, exported_tensors(folder))
        with torch.no_grad():
            logits = model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    report = {"missing_keys": sorted(info["missing_keys"]), "unexpected_keys": sorted(info["unexpected_keys"]),
              "mismatched_keys": sorted(map(str, info["mismatched_keys"])), "error_msgs": list(info["error_msgs"]),
              "parsed_config": {f: getattr(model.config, f) for f in PARSED_FIELDS},
              "patched_semantics": {"rotary_dim": rotary_dim, "slopes": "official"} if patched else None}
    return logits, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project_python", default=str(ROOT / ".venv" / "bin" / "python"))
    args = parser.parse_args()
    ids = np.load(GOLDEN / "hf_full_rope" / "input_ids.npy")
    reports = {"transformers_version": transformers.__version__, "torch_version": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for variant in VARIANTS:
            folder = export(args.project_python, variant, work)
            logits, report = transformers_logits(folder, ids, patched=variant == "official_partial_rope")
            derived = {k for k in report["missing_keys"] if k.endswith(DERIVED)}
            assert set(report["missing_keys"]) == derived and derived, report["missing_keys"]
            assert not report["unexpected_keys"] and not report["mismatched_keys"] and not report["error_msgs"]

            ours_path = work / f"{variant}_ours.npy"
            project(args.project_python, "-c", OUR_LOGITS, str(folder), str(GOLDEN / variant / "input_ids.npy"),
                    str(ours_path))
            report["max_abs_diff_vs_minimax_jax"] = float(np.abs(np.load(ours_path) - logits).max())
            report["max_abs_diff_vs_golden_logits"] = float(np.abs(np.load(GOLDEN / variant / "logits.npy")
                                                                    - logits).max())
            if variant == "official_partial_rope":  # plain transformers: everything but partial RoPE read right
                plain, _ = transformers_logits(folder, ids, patched=False)
                report["unpatched_max_abs_diff_vs_hf_full_rope_golden"] = float(
                    np.abs(np.load(GOLDEN / "hf_full_rope" / "logits.npy") - plain).max())
                report["unpatched_max_abs_diff_vs_minimax_jax"] = float(np.abs(np.load(ours_path) - plain).max())
            print(variant, json.dumps({k: v for k, v in report.items() if "diff" in k}, indent=1))
            assert report["max_abs_diff_vs_minimax_jax"] <= TOLERANCE

            target = OUT / variant
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            shutil.copy(folder / "config.json", target / "config.json")
            np.save(target / "logits.npy", logits.astype(np.float32))
            reports[variant] = report
    (OUT / "load_report.json").write_text(json.dumps(reports, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
