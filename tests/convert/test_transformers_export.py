"""An exported folder is what transformers 5.23 loads correctly, checked in CI without torch.

``tests/golden/transformers_export/`` holds what transformers did with folders this exporter wrote from the golden
weights (``tests/golden/make_transformers_export.py``, run in .ref-venv): the config.json it read, the config values
it parsed, the keys it reported missing / unexpected, and the logits it computed. Exporting the same weights here
must write the same config.json and the same tensors, and this project's model must give the same logits.
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.checkpoint import derived_buffer_names, from_pretrained, official_tensor_mappings
from minimax_jax.config import ModelConfig
from minimax_jax.convert import convert_hf_to_orbax, convert_orbax_to_hf, params_dir
from minimax_jax.convert.safetensors_format import INDEX_FILE, read_folder_index

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
EXPORT = GOLDEN / "transformers_export"
VARIANTS = ("hf_full_rope", "official_partial_rope")
TOLERANCE = 1e-4  # max |logit difference| in fp32


def _report() -> dict:
    return json.loads((EXPORT / "load_report.json").read_text())


@pytest.fixture(scope="module", params=VARIANTS)
def exported(request, tmp_path_factory) -> tuple[str, Path]:
    """(variant, folder): the golden weights through hf -> orbax -> sharded hf, as the golden script did."""
    work = tmp_path_factory.mktemp(request.param)
    convert_hf_to_orbax(str(GOLDEN / request.param), str(work / "orbax"), progress_stream=None)
    convert_orbax_to_hf(params_dir(str(work / "orbax")), str(work / "hf"), ModelConfig.from_json(work / "orbax"),
                        max_shard_bytes=300_000, progress_stream=None)
    return request.param, work / "hf"


def test_config_json_is_the_one_transformers_read(exported):
    variant, folder = exported
    written = json.loads((folder / "config.json").read_text())
    assert written == json.loads((EXPORT / variant / "config.json").read_text())
    assert written["model_type"] == "minimax" and written["architectures"] == ["MiniMaxForCausalLM"]
    config = ModelConfig.from_json(folder)
    assert config == ModelConfig.from_json(GOLDEN / variant)
    # The values transformers parsed from that file, read back as a transformers-format config, are our model:
    # layer types, residual factors, RoPE theta and partial factor, sizes, everything but transformers' RoPE defect.
    parsed = _report()[variant]["parsed_config"]
    assert ModelConfig.from_dict(parsed) == config
    assert parsed["layer_types"][:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert parsed["mlp_alpha_factor"] == parsed["linear_attn_alpha_factor"] == 2.0  # not transformers' default 1


def test_transformers_found_every_tensor_it_needs(exported):
    """Official names only; transformers fused the experts itself and missed only the buffers it recomputes."""
    variant, folder = exported
    config = ModelConfig.from_json(folder)
    names = set(read_folder_index(str(folder)))
    assert names == {m.name for m in official_tensor_mappings(config)}
    assert os.path.exists(folder / INDEX_FILE)
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    report = _report()[variant]
    assert report["missing_keys"] == sorted(derived_buffer_names(config))
    assert report["unexpected_keys"] == report["mismatched_keys"] == report["error_msgs"] == []


def test_logits_match_what_transformers_computed(exported):
    variant, folder = exported
    ids = jnp.asarray(np.load(GOLDEN / variant / "input_ids.npy"), jnp.int32)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(from_pretrained(folder, dtype=jnp.float32)(ids))
    err = float(np.max(np.abs(logits - np.load(EXPORT / variant / "logits.npy"))))
    print(f"{variant}: max |ours - transformers on the exported folder| = {err:.3e}")
    assert err <= TOLERANCE
