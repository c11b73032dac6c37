"""Golden logits from Hugging Face transformers 5.23 (tests/golden/make_golden.py), and proof they are sharp.

``hf_full_rope``: transformers as it is (full-head RoPE, transformers-format config, sharded safetensors with the
derived lightning buffers). ``official_partial_rope``: the released model's semantics (rotary_dim = head_dim / 2,
official slopes), official-format config, one safetensors file.
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import minimax_jax.model.lightning as lightning_module
from minimax_jax import from_pretrained

GOLDEN = Path(__file__).resolve().parent / "golden"
VARIANTS = ("hf_full_rope", "official_partial_rope")
TOLERANCE = 1e-4  # max |logit difference| in fp32


def _max_logit_error(folder: Path) -> float:
    model = from_pretrained(folder, dtype=jnp.float32)
    ids = np.load(folder / "input_ids.npy")
    logits = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    return float(np.max(np.abs(logits - np.load(folder / "logits.npy"))))


def _require(variant: str) -> Path:
    folder = GOLDEN / variant
    assert (folder / "logits.npy").exists(), f"golden data missing in {folder} (tests/golden/README.md)"
    return folder


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant):
    err = _max_logit_error(_require(variant))
    print(f"{variant}: max |logit difference| = {err:.3e}")
    assert err <= TOLERANCE


def _copy_with_config_change(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_wrong_rope_breaks_parity(tmp_path):
    """Full-head RoPE on the partial-RoPE checkpoint (transformers' defect) is far outside the tolerance."""
    src = _require("official_partial_rope")
    head_dim = json.loads((src / "config.json").read_text())["head_dim"]
    err = _max_logit_error(_copy_with_config_change(src, tmp_path / "full", rotary_dim=head_dim))
    print(f"rotary_dim=head_dim on the partial-rope checkpoint: max |logit difference| = {err:.3e}")
    assert err > 100 * TOLERANCE


@pytest.mark.parametrize("wrong_decay", ["scaled_by_1.1", "no_layer_factor"])
def test_wrong_decay_breaks_parity(monkeypatch, wrong_decay):
    src = _require("official_partial_rope")
    right = lightning_module.lightning_decay_rates
    if wrong_decay == "scaled_by_1.1":
        def wrong(num_heads, layer_index, num_layers):
            return 1.1 * right(num_heads, layer_index, num_layers)
    else:
        def wrong(num_heads, layer_index, num_layers):
            return jnp.asarray(lightning_module.alibi_slopes(num_heads), jnp.float32)
    monkeypatch.setattr(lightning_module, "lightning_decay_rates", wrong)
    err = _max_logit_error(src)
    print(f"decay {wrong_decay}: max |logit difference| = {err:.3e}")
    assert err > 100 * TOLERANCE
