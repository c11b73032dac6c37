"""model.hidden_states (the trainer's forward) gives the model's own logits; remat keeps the gradients."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.train.loss import logits_from_hidden
from tests.train.helpers import micro_model


def _model_and_batch():
    model = MiniMaxForCausalLM(micro_model(), dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    segments = jnp.concatenate([jnp.zeros((2, 10), jnp.int32), jnp.ones((2, 6), jnp.int32)], axis=1)
    positions = jnp.concatenate([jnp.arange(10), jnp.arange(6)])[None].repeat(2, axis=0).astype(jnp.int32)
    return model, ids, segments, positions


def test_hidden_states_give_the_model_logits():
    model, ids, segments, positions = _model_and_batch()
    expected, stats = model(ids, segment_ids=segments, positions=positions, return_router_stats=True)
    hidden, my_stats = model.hidden_states(ids, segment_ids=segments, positions=positions)
    np.testing.assert_array_equal(logits_from_hidden(hidden, model.lm_head[...]), expected)
    np.testing.assert_array_equal(my_stats.aux_loss, stats.aux_loss)
    np.testing.assert_array_equal(my_stats.expert_counts, stats.expert_counts)


def test_remat_keeps_the_gradients():
    model, ids, segments, positions = _model_and_batch()
    graphdef, params = nnx.split(model)

    def loss(params, policy):
        m = nnx.merge(graphdef, params)
        hidden, _ = m.hidden_states(ids, segment_ids=segments, positions=positions, remat_policy=policy)
        return jnp.sum(logits_from_hidden(hidden, m.lm_head[...]) ** 2)

    plain = jax.grad(loss)(params, "none")
    remat = jax.grad(loss)(params, "full")
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
