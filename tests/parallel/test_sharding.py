"""Logical axis rules: specs per weight, divisibility errors naming the dimension and axis, sharded creation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from minimax_jax.config import minimax_text_01, tiny
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.parallel.sharding import ShardingError, abstract_sharded, create_sharded, logical_to_spec, shard_batch
from tests.parallel.conftest import AXES, mesh_of


def _specs(state) -> dict[str, PartitionSpec]:
    return {"/".join(map(str, p)): v.get_value().sharding.spec for p, v in nnx.to_flat_state(state)}


def test_rules_map_logical_names_and_skip_absent_or_size_one_axes():
    mesh = AbstractMesh((2, 2, 2, 1, 2), AXES)
    assert logical_to_spec(("expert", "embed", "mlp"), mesh) == PartitionSpec("expert", "fsdp", "tensor")
    assert logical_to_spec(("batch", "seq", None), mesh) == PartitionSpec(("data", "fsdp", "expert"), None, None)
    only_data = AbstractMesh((4,), ("data",))
    assert logical_to_spec(("layers", "expert", "embed", "mlp"), only_data) == PartitionSpec(None, None, None, None)
    with pytest.raises(ShardingError, match="'fsdp' twice"):
        logical_to_spec(("batch", "embed"), mesh)


def test_full_456b_model_is_planned_abstractly_with_its_shardings():
    mesh = AbstractMesh((2, 8, 8, 1, 4), AXES)  # 512 devices that this machine does not have
    _, state = abstract_sharded(lambda: MiniMaxForCausalLM(minimax_text_01(), dtype=jnp.bfloat16), mesh)
    specs = _specs(state)
    assert specs["groups/layers/0/moe/w13"] == PartitionSpec(None, "expert", None, "fsdp", "tensor")
    assert specs["groups/layers/0/moe/w2"] == PartitionSpec(None, "expert", "tensor", "fsdp")
    assert specs["groups/layers/7/mixer/q_proj"] == PartitionSpec(None, "fsdp", "tensor", None)
    assert specs["embed_tokens"] == PartitionSpec("tensor", "fsdp")
    leaves = [v.get_value() for _, v in nnx.to_flat_state(state)]
    total = sum(int(np.prod(a.shape)) for a in leaves)
    per_device = sum(int(np.prod(a.sharding.shard_shape(a.shape))) for a in leaves)
    assert 4.5e11 < total < 4.6e11
    assert total / 256 <= per_device < total / 190  # experts split 8 x 8 x 4 ways, dense weights 32 ways


def test_sizes_that_do_not_divide_the_mesh_name_the_dimension_and_the_axis():
    mesh = AbstractMesh((1, 1, 8, 1, 1), AXES)
    with pytest.raises(ShardingError, match=r"moe\.w13: dimension 1 'expert' of size 4 \(config field num_local_"
                                            r"experts\) is not divisible by mesh axis 'expert'=8"):
        abstract_sharded(lambda: MiniMaxForCausalLM(tiny()), mesh)
    mesh = AbstractMesh((1, 1, 1, 1, 3), AXES)
    with pytest.raises(ShardingError, match=r"'mlp' of size 32 \(config field intermediate_size\).*'tensor'=3"):
        abstract_sharded(lambda: MiniMaxForCausalLM(tiny().replace(num_attention_heads=3, num_key_value_heads=3,
                                                                    vocab_size=513)), mesh)
    with pytest.raises(ShardingError, match=r"input: dimension 0 'batch' of size 6 .* 'expert'=4"):
        shard_batch(jnp.zeros((6, 4), jnp.int32), mesh_of({"expert": 4}))


def test_create_sharded_builds_parameters_in_place_equal_to_the_unsharded_init():
    config = tiny().replace(num_local_experts=8)
    mesh = mesh_of({"data": 2, "expert": 2, "tensor": 2})
    model = create_sharded(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(3)), mesh)
    reference = jax.jit(lambda: nnx.state(MiniMaxForCausalLM(config, rngs=nnx.Rngs(3))))()
    specs = _specs(nnx.state(model))
    assert specs["groups/layers/0/moe/w13"] == PartitionSpec(None, "expert", None, None, "tensor")
    assert specs["lm_head"] == PartitionSpec(None, "tensor")
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(reference),
                                      strict=True):
        assert got.get_value().sharding.mesh == mesh, path
        # same random draws; XLA may fuse the scaling differently once partitioned (a few ulp at most)
        np.testing.assert_allclose(np.asarray(got.get_value()), np.asarray(want.get_value()), rtol=1e-6,
                                   err_msg=str(path))
    w13 = nnx.state(model)["groups"]["layers"][0]["moe"]["w13"].get_value()
    assert w13.addressable_shards[0].data.shape == (2, 4, 2, 64, 16)
    assert jax.device_count() == 8
