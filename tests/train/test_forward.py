"""model.hidden_states (the trainer's forward) gives the model's own logits; remat keeps the gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.train.loss import logits_from_hidden
from tests.train.helpers import micro_model


def _model_and_batch(config=None):
    model = MiniMaxForCausalLM(config or micro_model(), dtype=jnp.float32, rngs=nnx.Rngs(0))
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


def _loss_fn(config=None):
    model, ids, segments, positions = _model_and_batch(config)
    graphdef, params = nnx.split(model)

    def loss(params, policy, scan_layers=True):
        m = nnx.merge(graphdef, params)
        hidden, _ = m.hidden_states(ids, segment_ids=segments, positions=positions, remat_policy=policy,
                                    scan_layers=scan_layers)
        return jnp.sum(logits_from_hidden(hidden, m.lm_head[...]) ** 2)

    return loss, params


@pytest.mark.parametrize("policy", ["full", "dots_and_kernel_outputs"])
def test_remat_keeps_the_gradients(policy):
    loss, params = _loss_fn()
    plain = jax.grad(loss)(params, "none")
    remat = jax.grad(loss)(params, policy)
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unrolled_layer_groups_give_the_scanned_loss_and_gradients():
    loss, params = _loss_fn(micro_model(num_hidden_layers=4, attn_type_list=(0, 1, 0, 1)))  # 2 layer groups
    scanned = jax.value_and_grad(loss)(params, "dots_and_kernel_outputs")
    unrolled = jax.value_and_grad(loss)(params, "dots_and_kernel_outputs", False)
    for scan_layers, unroll in ((True, 1), (False, 2)):
        jaxpr = jax.make_jaxpr(loss, static_argnums=(1, 2))(params, "none", scan_layers).jaxpr
        layer_scans = [e for e in jaxpr.eqns if e.primitive.name == "scan" and e.params["length"] == 2]
        assert [e.params["unroll"] for e in layer_scans] == [unroll]
    # fp32 round-off only: unrolled, the first layer's residual scales (1, 0) are constants XLA folds, which
    # changes its fusions; an absolute tolerance at 1e-6 of each leaf's scale (the embedding's reaches 20)
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))


def _count_primitives(jaxpr, name: str) -> int:
    """Equations of primitive ``name`` in a jaxpr and every jaxpr nested in its equations' parameters."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    count += _count_primitives(inner, name)
    return count


def test_kernel_outputs_policy_does_not_rerun_the_expert_matmuls():
    """The MoE's grouped matmuls (ragged_dot on CPU; Pallas kernels on GPU) are not XLA dots: dots_with_no_batch_dims
    recomputes their forward in the backward pass, dots_and_kernel_outputs keeps their outputs."""
    loss, params = _loss_fn()
    counts = {policy: _count_primitives(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, policy).jaxpr,
                                        "ragged_dot_general")
              for policy in ("none", "dots_with_no_batch_dims", "dots_and_kernel_outputs")}
    # the group body holds 2 MoE layers: dots_with_no_batch_dims runs their 2 forward matmuls each again
    assert counts["dots_with_no_batch_dims"] == counts["none"] + 4, counts
    assert counts["dots_and_kernel_outputs"] == counts["none"], counts


def test_norm_kernels_in_the_model_give_the_jnp_loss_and_gradients(monkeypatch):
    """The decoder's residual sums through the Pallas norm kernels (interpreted): both copies' gradients arrive."""
    from minimax_jax.model import transformer
    from pallas_kernels.add_rms_norm import add_rms_norm

    config = micro_model(hidden_size=128, layernorm_mlp_alpha=1.5, layernorm_full_attention_alpha=2.0,
                         layernorm_linear_attention_beta=0.5)
    loss, params = _loss_fn(config)
    want = jax.value_and_grad(loss)(params, "dots_and_kernel_outputs")
    kernel = functools.partial(add_rms_norm, use_kernel=True, interpret=jax.default_backend() != "gpu")
    monkeypatch.setattr(transformer, "add_rms_norm", kernel)
    got = jax.value_and_grad(loss)(params, "dots_and_kernel_outputs")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
