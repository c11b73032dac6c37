"""Profile attribution: device time of a traced train step grouped by the model's named scopes."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.train.config import OptimizerConfig
from minimax_jax.train.optimizer import learning_rate_schedule, make_optimizer
from minimax_jax.train.profiling import device_busy, device_op_times, hlo_op_names, scope_of, time_by_scope
from minimax_jax.train.step import init_train_state, make_train_step
from tests.train.helpers import micro_model


def test_scope_of_reads_named_scopes_and_direction():
    assert scope_of("jit(train_step)/transpose(jvp(moe))/experts/dot_general") == "moe/experts bwd"
    assert scope_of("jit(train_step)/jvp(loss_fn)/while/body/loss/exp") == "loss fwd"
    assert scope_of("jit(train_step)/optimizer/mul") == "optimizer fwd"
    assert scope_of("jit(train_step)/transpose") == "(unscoped transpose) fwd"  # an HLO transpose, not a vjp
    assert scope_of("jit(train_step)/while/body/transpose(jvp())/jit(dynamic_index_in_dim)") == (
        "(unscoped dynamic_index_in_dim) bwd")


def test_hlo_op_names_resolves_fusions_through_their_computation():
    text = """HloModule m
%fused_computation.3 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %exp.1 = f32[4]{0} exponential(%p), metadata={op_name="jit(f)/jvp(loss)/exp"}
}
ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %neg.2 = f32[4]{0} negate(%a), metadata={op_name="jit(f)/moe/neg"}
  ROOT %fusion.3 = f32[4]{0} fusion(%neg.2), kind=kLoop, calls=%fused_computation.3
}
"""
    names = hlo_op_names(text)
    assert names["neg.2"] == "jit(f)/moe/neg"
    assert names["fusion.3"] == "jit(f)/jvp(loss)/exp"


def test_traced_train_step_time_lands_in_model_scopes(tmp_path):
    model = MiniMaxForCausalLM(micro_model(), dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    optimizer = make_optimizer(config, 10)
    train_step = jax.jit(make_train_step(graphdef, optimizer, learning_rate_schedule(config, 10),
                                         loss_chunk_size=8, grad_accum_steps=2))
    ids = jax.random.randint(jax.random.key(1), (4, 17), 0, 256)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": jnp.zeros((4, 16), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16)),
             "loss_mask": jnp.ones((4, 16), jnp.float32)}
    train_state = init_train_state(params, optimizer, 0)
    op_names = hlo_op_names(train_step.lower(train_state, batch).compile().as_text())
    jax.block_until_ready(train_step(train_state, batch))
    jax.profiler.start_trace(str(tmp_path))
    jax.block_until_ready(train_step(train_state, batch))
    jax.profiler.stop_trace()
    (trace_file,) = tmp_path.rglob("*.trace.json.gz")
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    with pytest.raises(ValueError, match="no device ops"):
        device_op_times({"traceEvents": [e for e in trace["traceEvents"] if "hlo_op" not in e.get("args", {})]})
    totals = time_by_scope(device_op_times(trace), op_names)
    labels = {label.split(" ")[0] for label in totals}
    for scope in ("moe", "lightning_attention", "softmax_attention", "loss", "optimizer", "grad_norm"):
        assert any(label.startswith(scope) for label in labels), (scope, sorted(totals))
    assert any(label.endswith("bwd") for label in totals), sorted(totals)
    assert "(not in the HLO)" not in totals, sorted(totals)


def test_device_busy_is_the_union_of_op_intervals():
    def op(ts, dur):
        return {"ph": "X", "pid": 1, "ts": ts, "dur": dur, "name": "k"}

    trace = {"traceEvents": [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
                             op(0, 10), op(5, 20), op(40, 5), op(41, 1)]}
    assert device_busy(trace) == (30.0, 45.0)  # [0, 25] and [40, 45] busy, 45 us from first start to last end
