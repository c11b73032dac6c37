"""The whole model on 8 simulated devices (expert 8; expert 4 x data 2; expert 2 x tensor 2 x data 2) gives the
single-device logits, per-layer aux losses, expert counts and parameter gradients (fp32, 1e-5 relative).

Under Auto axis types the compiler places the dense layers' collectives; under Explicit ones the shardings are part
of the types (the embedding lookup and the lightning op's zero state say theirs). The MoE runs in its shard_map.
Parameters are created sharded by ``create_sharded``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from minimax_jax.config import LIGHTNING, SOFTMAX, tiny
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.parallel.sharding import create_sharded, shard_batch
from tests.parallel.conftest import assert_rel_close, mesh_of

# One lightning + one softmax layer (the scan body of the real 7+1 stack, shortened), 8 experts.
CONFIG = tiny().replace(num_hidden_layers=2, attn_type_list=(LIGHTNING, SOFTMAX), num_local_experts=8)
MESHES = {"expert8": {"expert": 8}, "expert4_data2": {"expert": 4, "data": 2},
          "expert2_tensor2_data2": {"expert": 2, "tensor": 2, "data": 2}}


def _loss(state, graphdef, input_ids, cotangent):
    logits, stats = nnx.merge(graphdef, state)(input_ids, return_router_stats=True)
    return jnp.mean(logits * cotangent) + jnp.sum(stats.aux_loss), (logits, stats)


_value_and_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=1)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (8, 16)), jnp.int32)
    cotangent = jnp.asarray(rng.standard_normal((8, 16, CONFIG.vocab_size)), jnp.float32)
    return input_ids, cotangent


@pytest.fixture(scope="module")
def single_device(batch):
    graphdef, state = nnx.split(MiniMaxForCausalLM(CONFIG, rngs=nnx.Rngs(1)))
    (_, (logits, stats)), grads = _value_and_grad(state, graphdef, *batch)
    return logits, stats, grads


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_model_equals_single_device(mesh_name, axis_type, batch, single_device):
    mesh = mesh_of(MESHES[mesh_name], axis_type)
    graphdef, state = nnx.split(create_sharded(lambda: MiniMaxForCausalLM(CONFIG, rngs=nnx.Rngs(1)), mesh))
    with jax.set_mesh(mesh):
        (_, (logits, stats)), grads = _value_and_grad(state, graphdef, *(shard_batch(a, mesh) for a in batch))
    want_logits, want_stats, want_grads = single_device
    errors = {"logits": assert_rel_close(logits, want_logits, name="logits"),
              "aux_loss": assert_rel_close(stats.aux_loss, want_stats.aux_loss, name="aux_loss")}
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), np.asarray(want_stats.expert_counts))
    for (path, got), (_, want) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads), strict=True):
        name = "/".join(map(str, path))
        errors[name] = assert_rel_close(got.get_value(), want.get_value(), name=f"grad {name}")
    worst = max((k for k in errors if k not in ("logits", "aux_loss")), key=errors.get)
    print(f"{mesh_name}: logits {errors['logits']:.2e}, aux {errors['aux_loss']:.2e}, "
          f"worst grad {worst} {errors[worst]:.2e}")
