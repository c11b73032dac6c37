"""MoE: routing, dropless grouped matmuls (ragged_dot) against a per-expert reference, aux loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.model.moe import (
    Routing,
    dropless_experts,
    expert_token_counts,
    route,
    router_z_loss,
    switch_aux_loss,
    top_k_by_argmax,
)
from pallas_kernels.grouped_matmul import weighted_swiglu, weighted_swiglu_grad
from pallas_kernels.grouped_matmul.swiglu import kernel_fits, weighted_swiglu_grad_kernel
from tests.model import numpy_reference as ref


def per_expert_reference(x, routing: Routing, w1, w3, w2):
    """Plain loop over experts: every expert runs on the tokens that chose it (one-hot weights)."""
    y = jnp.zeros_like(x)
    for e in range(w1.shape[0]):
        weight = jnp.sum(jnp.where(routing.experts == e, routing.weights, 0.0), axis=-1)  # [T], 0 if not chosen
        out = (jax.nn.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]
        y = y + weight[:, None] * out
    return y


def _weights(seed, num_experts=5, hidden=12, inter=7):
    rng = np.random.default_rng(seed)
    # fan-in scaled, so outputs are O(1) and the sin() losses below stay well conditioned
    w1, w3 = (jnp.asarray(rng.standard_normal((num_experts, hidden, inter)) / np.sqrt(hidden), jnp.float32)
              for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((num_experts, inter, hidden)) / np.sqrt(inter), jnp.float32)
    return w1, w3, w2


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_by_argmax_equals_top_k_with_ties(k):
    """Values, indices (ties: lower index first) and the gradient of the values equal ``jax.lax.top_k``."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 4, (64, 7)), jnp.float32)  # many ties
    for got, want in zip(top_k_by_argmax(x, k), jax.lax.top_k(x, k), strict=True):
        np.testing.assert_array_equal(got, want)
    ct = jnp.arange(64 * k, dtype=jnp.float32).reshape(64, k)
    grad = jax.grad(lambda x_, f: jnp.sum(f(x_, k)[0] * ct), argnums=0)
    np.testing.assert_array_equal(grad(x, top_k_by_argmax), grad(x, jax.lax.top_k))


def _swiglu_problem(dtype, rows=6, width=5):
    rng = np.random.default_rng(1)
    gate_up = jnp.asarray(rng.standard_normal((rows, 2 * width)) * 3, dtype)
    row_weight = jnp.asarray(rng.uniform(0, 1, rows), jnp.float32).at[-1].set(0.0)  # a padding row: weight 0
    d_hidden = jnp.asarray(rng.standard_normal((rows, width)), dtype)
    return gate_up, row_weight, d_hidden


def _weighted_swiglu_formula(h, w):
    width = h.shape[-1] // 2
    return w[:, None] * jax.nn.silu(h[:, :width].astype(jnp.float32)) * h[:, width:].astype(jnp.float32)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_weighted_swiglu_value_and_gradients_equal_autodiff_of_the_formula(dtype, tol):
    gate_up, row_weight, d_hidden = _swiglu_problem(dtype)
    got, vjp = jax.vjp(weighted_swiglu, gate_up, row_weight)
    want, want_vjp = jax.vjp(_weighted_swiglu_formula, gate_up, row_weight)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)
    for g, w in zip(vjp(d_hidden), want_vjp(d_hidden.astype(jnp.float32)), strict=True):
        assert g.dtype in (dtype, jnp.float32)
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_weighted_swiglu_gradient_kernel_equals_the_jnp_gradient(dtype, tol):
    """The Pallas-Triton gradient kernel (interpret mode on CPU) against ``weighted_swiglu_grad``."""
    gate_up, row_weight, d_hidden = _swiglu_problem(dtype, rows=32, width=16)
    assert kernel_fits(gate_up) and not kernel_fits(gate_up[:, :24]) and not kernel_fits(gate_up[:17])
    got = weighted_swiglu_grad_kernel(gate_up, row_weight, d_hidden, interpret=jax.default_backend() != "gpu")
    want = weighted_swiglu_grad(gate_up, row_weight, d_hidden)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_route_renormalizes_top_k_of_fp32_softmax():
    logits = jnp.asarray([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 5.0]], jnp.bfloat16)
    routing = route(logits, 2)
    assert routing.probs.dtype == jnp.float32 and routing.weights.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(routing.experts), [[1, 2], [2, 3]])
    np.testing.assert_allclose(np.asarray(routing.weights), [[np.e / (np.e + 1), 1 / (np.e + 1)], [0.5, 0.5]],
                               rtol=1e-6)


@pytest.mark.parametrize("backend", ["xla", "reference", "triton"])
def test_dropless_equals_per_expert_loop_with_uneven_loads_and_empty_experts(backend):
    hidden, inter = (32, 16) if backend == "triton" else (12, 7)  # triton wants multiples of 16
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((9, hidden)), jnp.float32)
    # Expert 0 is chosen by most tokens, experts 3 and 4 by none; rows are (first, second) choices.
    experts = jnp.asarray([[0, 1], [0, 2], [1, 0], [0, 2], [2, 0], [0, 1], [1, 0], [0, 2], [2, 1]], jnp.int32)
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((9, 2)), jnp.float32), axis=-1)
    routing = Routing(weights, experts, jnp.full((9, 5), 0.2))
    w1, w3, w2 = _weights(1, hidden=hidden, inter=inter)
    np.testing.assert_array_equal(np.asarray(expert_token_counts(experts, 5)), [8, 5, 5, 0, 0])
    out = dropless_experts(x, routing, jnp.stack([w1, w3], axis=1), w2, backend=backend)
    np.testing.assert_allclose(np.asarray(out), np.asarray(per_expert_reference(x, routing, w1, w3, w2)),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["xla", "triton"])
def test_dropless_gradients_equal_reference_gradients(backend):
    hidden, inter = (32, 16) if backend == "triton" else (12, 7)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((6, hidden)), jnp.float32)
    routing = route(jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), 2)
    w = _weights(3, hidden=hidden, inter=inter)

    def dropless(x, routing, w1, w3, w2):  # the stacking's gradient splits dw13 into dw1, dw3
        return dropless_experts(x, routing, jnp.stack([w1, w3], axis=1), w2, backend=backend)

    def loss(fn, x, w1, w3, w2):
        return jnp.sum(jnp.sin(fn(x, routing, w1, w3, w2)))

    got = jax.grad(lambda *a: loss(dropless, *a), argnums=(0, 1, 2, 3))(x, *w)
    want = jax.grad(lambda *a: loss(per_expert_reference, *a), argnums=(0, 1, 2, 3))(x, *w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_routing_and_experts_match_numpy_per_token_moe():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 12)).astype(np.float32)
    gate = rng.standard_normal((5, 12)).astype(np.float32)
    w1, w3, w2 = (np.asarray(a) for a in _weights(5))
    routing = route(jnp.asarray(x) @ jnp.asarray(gate.T), 2)
    out = dropless_experts(jnp.asarray(x), routing, jnp.stack([w1, w3], axis=1), jnp.asarray(w2))
    # numpy per-token loop takes official layouts: w1/w3 [E, inter, hidden], w2 [E, hidden, inter].
    y, probs, counts = ref.moe(x.astype(np.float64), gate, w1.transpose(0, 2, 1), w2.transpose(0, 2, 1),
                             w3.transpose(0, 2, 1), 2)
    np.testing.assert_allclose(np.asarray(out), y, rtol=1e-5, atol=1e-4)
    want_aux = ref.switch_aux_loss(probs, counts)
    assert float(switch_aux_loss(routing.probs, routing.experts)) == pytest.approx(want_aux, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(expert_token_counts(routing.experts, 5)), counts)


def test_aux_loss_on_hand_checkable_cases():
    # Two experts, every token routed to expert 0 with prob 0.75: E * f0 * P0 = 2 * 1 * 0.75.
    probs = jnp.asarray([[0.75, 0.25], [0.75, 0.25]])
    assert float(switch_aux_loss(probs, jnp.asarray([[0], [0]]))) == pytest.approx(1.5)
    # Perfect balance gives 1: four experts, uniform probs, each chosen by one of four token slots.
    uniform = jnp.full((2, 4), 0.25)
    assert float(switch_aux_loss(uniform, jnp.asarray([[0, 1], [2, 3]]))) == pytest.approx(1.0)
    # f = (3/4, 1/4, 0), P = (0.5, 0.3, 0.2): 3 * (0.375 + 0.075) = 1.35.
    probs3 = jnp.asarray([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]])
    assert float(switch_aux_loss(probs3, jnp.asarray([[0, 1], [0, 0]]))) == pytest.approx(1.35)


def test_router_z_loss_is_mean_squared_logsumexp():
    # Uniform logits over 4 experts: logsumexp = log 4 + c for a constant shift c.
    logits = jnp.asarray([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], jnp.bfloat16)
    want = (np.log(4.0) ** 2 + (1 + np.log(4.0)) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(want, rel=1e-6)


