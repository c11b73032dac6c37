"""Expert-parallel MoE (shard_map + ragged all-to-all) equals the single-device dropless MoE, values and gradients,
with uneven expert loads and experts that receive no token; router statistics are those of the whole group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from minimax_jax.model.moe import dropless_experts, expert_token_counts, route, router_z_loss, switch_aux_loss
from minimax_jax.parallel.expert_parallel import expert_parallel_moe
from minimax_jax.parallel.sharding import ShardingError
from tests.parallel.conftest import assert_rel_close, mesh_of

BATCH, SEQ, HIDDEN, INTER, EXPERTS, TOP_K = 8, 6, 16, 8, 8, 2
EMPTY_EXPERTS = (3, 6)


def _inputs():
    """Feature 0 of every token is 1, so router row 0 acts as a bias: experts 3 and 6 never win, expert 0 often."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    x[..., 0] = 1.0
    router = rng.standard_normal((HIDDEN, EXPERTS)).astype(np.float32) / 4
    router[0] = 0.0
    router[0, list(EMPTY_EXPERTS)] = -30.0
    router[0, 0] = 1.5
    w13 = rng.standard_normal((EXPERTS, 2, HIDDEN, INTER)).astype(np.float32) / 4
    w2 = rng.standard_normal((EXPERTS, INTER, HIDDEN)).astype(np.float32) / 3
    cotangent = rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    return tuple(jnp.asarray(a) for a in (x, router, w13, w2)), jnp.asarray(cotangent)


def _single_device(x, router, w13, w2):
    tokens = x.reshape(-1, HIDDEN)
    logits = tokens @ router
    routing = route(logits, TOP_K)
    y = dropless_experts(tokens, routing, w13, w2).reshape(x.shape)
    counts = expert_token_counts(routing.experts, EXPERTS)
    return y, switch_aux_loss(routing.probs, routing.experts), router_z_loss(logits), counts


def _parallel(x, router, w13, w2):
    y, stats = expert_parallel_moe(x, router, w13, w2, num_experts_per_tok=TOP_K)
    return y, stats.aux_loss, stats.z_loss, stats.expert_counts


def _loss(fn, cotangent):
    def loss(*args):
        y, aux, z, _ = fn(*args)
        return jnp.sum(y * cotangent) + aux + z
    return loss


MESHES = {"expert2": {"expert": 2}, "expert8": {"expert": 8}, "expert4_data2": {"expert": 4, "data": 2},
          "expert2_tensor2_data2": {"expert": 2, "tensor": 2, "data": 2}, "data2_fsdp2_sequence2": {
              "data": 2, "fsdp": 2, "sequence": 2}}


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_expert_parallel_equals_single_device(mesh_name, axis_type):
    args, cotangent = _inputs()
    want = _single_device(*args)
    counts = np.asarray(want[3])
    assert all(counts[e] == 0 for e in EMPTY_EXPERTS) and counts.max() > 2 * counts.sum() / EXPERTS  # uneven
    grads_want = jax.grad(_loss(_single_device, cotangent), argnums=range(4))(*args)

    with jax.set_mesh(mesh_of(MESHES[mesh_name], axis_type)):
        got = jax.jit(_parallel)(*args)
        grads = jax.jit(jax.grad(_loss(_parallel, cotangent), argnums=range(4)))(*args)
    for name, g, w in zip(("output", "aux_loss", "z_loss"), got[:3], want[:3], strict=True):
        assert_rel_close(g, w, name=name)
    np.testing.assert_array_equal(np.asarray(got[3]), counts)
    for name, g, w in zip(("x", "router", "w13", "w2"), grads, grads_want, strict=True):
        assert_rel_close(g, w, name=f"d{name}")


def test_aux_loss_is_balanced_over_the_group_not_per_device():
    """Each device sees a skewed batch but the group is balanced: the global statistic is not the per-device mean."""
    x = jnp.zeros((8, 1, 8)).at[:, 0, :].set(jnp.eye(8))  # token i has feature i
    router = jnp.eye(8) * 5.0  # token i prefers expert i
    w13, w2 = jnp.zeros((8, 2, 8, 8)), jnp.zeros((8, 8, 8))
    with jax.set_mesh(mesh_of({"data": 8})):
        _, stats = jax.jit(lambda *a: expert_parallel_moe(*a, num_experts_per_tok=2))(x, router, w13, w2)
    routing = route(x.reshape(8, 8) @ router, 2)
    global_aux = switch_aux_loss(routing.probs, routing.experts)
    per_device = jnp.mean(jnp.stack([switch_aux_loss(routing.probs[i:i + 1], routing.experts[i:i + 1])
                                     for i in range(8)]))
    assert float(per_device) > 1.5 * float(global_aux)
    assert float(stats.aux_loss) == pytest.approx(float(global_aux), rel=1e-6)


def test_experts_not_divisible_by_expert_axis_is_an_error_naming_both():
    args, _ = _inputs()
    x, router, w13, w2 = args
    with jax.set_mesh(mesh_of({"expert": 8})), pytest.raises(ShardingError, match=r"num_local_experts=6.*'expert'"):
        expert_parallel_moe(x, router[:, :6], w13[:6], w2[:6], num_experts_per_tok=TOP_K)
