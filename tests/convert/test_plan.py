"""The dry-run plan covers the full released model without reading tensors, and checks the target mesh."""

import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec

from minimax_jax.config import minimax_text_01
from minimax_jax.convert.plan import conversion_plan, parse_mesh
from minimax_jax.parallel.sharding import ShardingError


def test_full_model_plan_maps_every_official_tensor_once():
    config, mesh = minimax_text_01(), parse_mesh("fsdp=8,expert=8,tensor=2")
    plans = conversion_plan(config, "bfloat16", mesh)
    names = [m.name for p in plans for m in p.mappings]
    assert len(names) == len(set(names)) == 8243
    w13 = next(p for p in plans if ".".join(p.key) == "groups.layers.0.moe.w13")
    assert w13.shape == (10, 32, 2, 6144, 9216)
    assert w13.spec == PartitionSpec(None, "expert", None, "fsdp", "tensor")
    assert w13.chunk_shape == (1, 1, 1, 768, 4608)
    assert [m.index for m in w13.mappings[:2]] == [(0, 0, 0), (0, 0, 1)]  # expert 0's w1, then its w3
    total = sum(p.nbytes for p in plans) / 2
    assert 456.0e9 < total < 456.2e9  # 456.09B parameters


def test_mesh_that_does_not_divide_names_the_parameter():
    with pytest.raises(ShardingError, match=r"moe\.w13: dimension 1 'expert' of size 32"):
        conversion_plan(minimax_text_01(), "bfloat16", parse_mesh("expert=3"))


def test_dry_run_script_prints_the_full_mapping():
    result = subprocess.run([sys.executable, "scripts/convert_hf_to_orbax.py", "--config=minimax_text_01",
                             "--mesh=fsdp=8,expert=8", "--dry_run"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum(" -> " in line and line.startswith(("model.", "lm_head.weight")) for line in lines) == 8243
    assert "model.layers.79.block_sparse_moe.experts.31.w2.weight  [6144, 9216]  -> groups.layers.7.moe.w2[9][31]  T" \
        in lines
    assert "# 75 parameters, 8243 official tensors, 912.179 GB in bfloat16" in lines
