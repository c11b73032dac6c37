"""HF -> orbax -> HF is bit-exact, the orbax checkpoint is the trainer's layout, logits equal from_pretrained."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors import safe_open

from minimax_jax.checkpoint import derived_buffer_names, from_pretrained
from minimax_jax.config import ModelConfig
from minimax_jax.convert import convert_hf_to_orbax, convert_orbax_to_hf, load_model, params_dir, parse_mesh
from minimax_jax.convert.plan import conversion_plan
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.train.checkpointing import stringify_keys


def _read_all(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a folder, read with the safetensors library (what transformers uses)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="numpy") as f:
                out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def test_round_trip_is_bit_exact_and_logits_match(golden, tmp_path):
    orbax_dir, hf_dir = str(tmp_path / "orbax"), str(tmp_path / "hf")
    report = convert_hf_to_orbax(golden, orbax_dir, progress_stream=None)
    config = ModelConfig.from_json(golden)
    assert report.tensors == 155 and report.bytes_read == report.bytes_written
    assert ModelConfig.from_json(orbax_dir) == config
    convert_orbax_to_hf(params_dir(orbax_dir), hf_dir, ModelConfig.from_json(orbax_dir), max_shard_bytes=300_000,
                        progress_stream=None)

    source, exported = _read_all(golden), _read_all(hf_dir)
    weights = set(source) - derived_buffer_names(config)
    assert set(exported) == weights
    for name in weights:
        assert exported[name].dtype == source[name].dtype, name
        np.testing.assert_array_equal(exported[name].view(np.uint16), source[name].view(np.uint16), err_msg=name)
    assert ModelConfig.from_json(hf_dir) == config
    assert len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]) > 1  # sharded, with an index
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))

    ids = jnp.asarray(np.load(os.path.join(golden, "input_ids.npy")))
    expected = np.asarray(from_pretrained(golden)(ids))
    np.testing.assert_array_equal(np.asarray(load_model(orbax_dir)(ids)), expected)


def test_trainer_restores_converted_params(golden, tmp_path):
    """The params item restores exactly as the trainer's Checkpointer restores it (CheckpointManager + Composite)."""
    config = ModelConfig.from_json(golden)
    convert_hf_to_orbax(golden, str(tmp_path), dtype="float32", step=7, progress_stream=None)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: MiniMaxForCausalLM(config)), nnx.Param))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    manager = ocp.CheckpointManager(tmp_path)
    assert manager.latest_step() == 7
    restored = manager.restore(7, args=ocp.args.Composite(params=ocp.args.StandardRestore(stringify_keys(target))))
    reference = stringify_keys(nnx.to_pure_dict(nnx.state(from_pretrained(golden), nnx.Param)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored["params"], reference)


def test_chunks_follow_target_mesh_and_restore_on_a_mesh(tmp_path):
    golden = os.path.join(os.path.dirname(__file__), "..", "golden", "official_partial_rope")
    config = ModelConfig.from_json(golden)
    mesh = parse_mesh("expert=2,fsdp=2")
    convert_hf_to_orbax(golden, str(tmp_path), mesh=mesh, progress_stream=None)
    plans = {".".join(p.key): p for p in conversion_plan(config, "bfloat16", mesh)}
    stored = ocp.StandardCheckpointer().metadata(params_dir(str(tmp_path))).item_metadata.tree
    w13 = stored["groups"]["layers"]["0"]["moe"]["w13"]
    assert w13.storage.chunk_shape == plans["groups.layers.0.moe.w13"].chunk_shape == (1, 1, 1, 32, 32)
    embed = stored["embed_tokens"]
    assert embed.storage.chunk_shape == (256, 32)  # hidden 64 split over fsdp=2

    # Restore onto a real 2 x 2 mesh (4 host CPU devices, in a fresh process): each array lands in its sharding.
    script = f"""
import jax, numpy as np
from flax import nnx
from minimax_jax.checkpoint import from_pretrained
from minimax_jax.convert import load_model
mesh = jax.make_mesh((2, 2), ("expert", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
model = load_model({str(tmp_path)!r}, mesh=mesh)
w13 = model.groups.layers[0].moe.w13.get_value()
assert w13.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, "fsdp", None), w13.sharding
assert len(w13.addressable_shards) == 4 and w13.addressable_shards[0].data.shape == (2, 2, 2, 32, 32)
expected = nnx.to_pure_dict(nnx.state(from_pretrained({golden!r}), nnx.Param))
jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
             nnx.to_pure_dict(nnx.state(model, nnx.Param)), expected)
print("restored on mesh ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "restored on mesh ok" in result.stdout, result.stderr[-3000:]
