"""The train step: it lowers the loss, accumulation equals the big batch, and a non-finite step is skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minimax_jax.model.transformer import MATMUL_WEIGHTS, MiniMaxForCausalLM, cast_matmul_weights
from minimax_jax.train.config import OptimizerConfig
from minimax_jax.train.optimizer import clip_by_global_norm, learning_rate_schedule, make_optimizer, update_count
from minimax_jax.train.step import init_train_state, make_loss_fn, make_train_step
from tests.train.helpers import micro_model

STEPS = 20


@pytest.fixture(scope="module")
def setup():
    model = MiniMaxForCausalLM(micro_model(), dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    optimizer, schedule = make_optimizer(config, STEPS), learning_rate_schedule(config, STEPS)
    ids = jax.random.randint(jax.random.key(1), (4, 17), 0, 256)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": jnp.zeros((4, 16), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16)),
             "loss_mask": jnp.ones((4, 16), jnp.float32).at[0, :5].set(0.0)}
    return graphdef, params, optimizer, schedule, batch


def test_steps_lower_the_loss_on_a_fixed_batch(setup):
    graphdef, params, optimizer, schedule, batch = setup
    step = jax.jit(make_train_step(graphdef, optimizer, schedule, aux_loss_coef=1e-3, loss_chunk_size=8))
    state = init_train_state(params, optimizer, 0)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(512), abs=0.1)  # untrained: uniform over the vocabulary
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_grad_accumulation_equals_the_big_batch(setup):
    # The aux loss is averaged over micro-batches (not a function of the whole batch), so it is off here. Plain SGD
    # with lr 1 makes the update the gradient itself (Adam's first step, g / |g|, amplifies rounding near g = 0).
    graphdef, params, _, schedule, batch = setup
    optimizer = optax.sgd(1.0)
    big = jax.jit(make_train_step(graphdef, optimizer, schedule, grad_accum_steps=1))
    accumulated = jax.jit(make_train_step(graphdef, optimizer, schedule, grad_accum_steps=4))
    state_big, metrics_big = big(init_train_state(params, optimizer, 0), batch)
    state_acc, metrics_acc = accumulated(init_train_state(params, optimizer, 0), batch)
    np.testing.assert_allclose(metrics_acc["loss"], metrics_big["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_acc["grad_norm"], metrics_big["grad_norm"], rtol=1e-5)
    np.testing.assert_array_equal(metrics_acc["expert_counts"], metrics_big["expert_counts"])
    updates_acc = jax.tree.map(jnp.subtract, state_acc["params"], params)
    updates_big = jax.tree.map(jnp.subtract, state_big["params"], params)
    for a, b in zip(jax.tree.leaves(updates_acc), jax.tree.leaves(updates_big), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_non_finite_step_is_skipped(setup):
    graphdef, params, optimizer, schedule, batch = setup
    step = jax.jit(make_train_step(graphdef, optimizer, schedule))
    state = init_train_state(params, optimizer, 0)
    poisoned = {**batch, "loss_mask": batch["loss_mask"].at[1, 3].set(jnp.nan)}
    after, metrics = step(jax.tree.map(jnp.copy, state), poisoned)
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(update_count(after["opt_state"])) == 0 and int(after["step"]) == 1
    after, metrics = step(after, batch)  # a finite batch then updates
    assert int(metrics["skipped"]) == 0 and int(update_count(after["opt_state"])) == 1
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["params"]),
                                                         jax.tree.leaves(state["params"]), strict=True)]
    assert any(changed)
    assert optax.tree.norm(after["params"]) > 0


@pytest.mark.parametrize("scale", [1e-3, 1e3])  # below and above the clipping norm
def test_clip_with_a_given_norm_matches_optax(scale):
    grads = {"w": scale * jnp.arange(12.0).reshape(3, 4), "b": scale * jnp.ones(5)}
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert ours.init(grads) == theirs.init(grads)  # same (empty) state: checkpoints restore either way
    want, _ = theirs.update(grads, theirs.init(grads))
    for got, _ in (ours.update(grads, ours.init(grads)),
                   ours.update(grads, ours.init(grads), global_norm=optax.tree.norm(grads))):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_the_step_computes_the_gradient_norm_once(setup):
    """The metrics' grad norm feeds the clipping: no reduction runs inside the update (it read all gradients)."""
    graphdef, params, optimizer, schedule, batch = setup
    step = make_train_step(graphdef, optimizer, schedule)
    jaxpr = jax.make_jaxpr(step)(init_train_state(params, optimizer, 0), batch)
    (cond,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
    update_branch = cond.params["branches"][1]
    assert not [eqn for eqn in update_branch.eqns if eqn.primitive.name.startswith("reduce")]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gradients_of_the_cast_matmul_weights_are_the_fp32_gradients_in_bf16(setup, scan_layers):
    """The step differentiates with respect to ``cast_matmul_weights``: those gradients must be exactly the fp32
    ones (before their conversion) and bf16; every other gradient stays fp32 and unchanged."""
    _, _, _, _, batch = setup
    model = MiniMaxForCausalLM(micro_model(), dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    loss_fn = make_loss_fn(graphdef, remat_policy="dots_and_kernel_outputs", loss_chunk_size=8, aux_loss_coef=1e-3,
                           scan_layers=scan_layers)
    grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
    num_tokens = jnp.sum(batch["loss_mask"])
    want, _ = grad_fn(params, batch, num_tokens)
    got, _ = grad_fn(cast_matmul_weights(params, jnp.bfloat16), batch, num_tokens)
    cast_names = set()
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        name = path[-1].key
        assert g.dtype == (jnp.bfloat16 if name in MATMUL_WEIGHTS else jnp.float32), (path, g.dtype)
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w), err_msg=str(path))
        cast_names.add(name)
    assert MATMUL_WEIGHTS <= cast_names  # every listed weight exists in the model
