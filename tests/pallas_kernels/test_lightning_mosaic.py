"""Mosaic (TPU) lightning-attention kernels: interpret-mode numerics on CPU, TPU lowering and (optional) compile.

* numerics: the kernels run under the TPU interpreter (``pltpu.InterpretParams(detect_races=True)``) and must
  match the project's oracle (``backend="reference"``, a ``lax.scan`` recurrence differentiated by autodiff) and a
  float64 numpy evaluation of the recurrence and its hand-written adjoint; every interpreted kernel must finish
  with no race reported by the interpreter's race detector;
* lowering: ``jax.export`` for ``platforms=["tpu"]`` of the forward and of ``jax.grad`` of a loss, at model shapes,
  inside ``jax.shard_map`` over a 4-way batch-sharded (abstract) mesh;
* compile: when ``libtpu`` is importable, AOT-compile the same for v5e and v6e topologies (skipped otherwise).
"""

from __future__ import annotations

import functools
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.lightning import mosaic, ops

KERNEL_NAMES = ("lightning_mosaic_fwd", "lightning_mosaic_bwd_dq", "lightning_mosaic_bwd_dkv")


# ----------------------------------------------------------------------------------------------------------------
# Race detection: the interpreter keeps one RaceDetectionState per interpreted kernel (module global ``races``,
# replaced by the next kernel). Record every instance so that all kernels of a forward/backward are checked.


@pytest.fixture
def race_log(monkeypatch):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    base = ipc.RaceDetectionState
    created = []

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(ipc, "RaceDetectionState", Recording)
    return created


def _assert_no_races(race_log, min_kernels):
    assert len(race_log) >= min_kernels, f"expected >= {min_kernels} interpreted kernels, saw {len(race_log)}"
    assert not any(r.races_found for r in race_log), "the TPU interpreter detected a race"


# ----------------------------------------------------------------------------------------------------------------
# float64 numpy oracle: the recurrence S_t = keep_t e^{-s} S_{t-1} + k_t^T v_t, o_t = q_t S_t and its adjoint.


def _np_keep(seg, b, t, a):
    return 0.0 if (t > 0 and seg[b, t] != seg[b, t - 1]) else a


def np_forward(q, k, v, decay, seg, s0):
    q, k, v, s0 = (np.asarray(x, np.float64) for x in (q, k, v, s0))
    seg = np.asarray(seg)
    bsz, n, nh, d = q.shape
    o = np.zeros_like(q)
    fin = np.zeros((bsz, nh, d, d))
    for b in range(bsz):
        for h in range(nh):
            a = np.exp(-float(decay[h]))
            s = s0[b, h].copy()
            for t in range(n):
                s = _np_keep(seg, b, t, a) * s + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = q[b, t, h] @ s
            fin[b, h] = s
    return o, fin


def np_backward(q, k, v, decay, seg, s0, do, dfin):
    q, k, v, s0, do, dfin = (np.asarray(x, np.float64) for x in (q, k, v, s0, do, dfin))
    seg = np.asarray(seg)
    bsz, n, nh, d = q.shape
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    ds0 = np.zeros((bsz, nh, d, d))
    for b in range(bsz):
        for h in range(nh):
            a = np.exp(-float(decay[h]))
            keep = [_np_keep(seg, b, t, a) for t in range(n)]
            s, states = s0[b, h].copy(), []
            for t in range(n):
                s = keep[t] * s + np.outer(k[b, t, h], v[b, t, h])
                states.append(s)
            g = dfin[b, h].copy()  # gradient of S_t
            for t in range(n - 1, -1, -1):
                g = g + np.outer(q[b, t, h], do[b, t, h])
                dq[b, t, h] = states[t] @ do[b, t, h]
                dk[b, t, h] = g @ v[b, t, h]
                dv[b, t, h] = g.T @ k[b, t, h]
                g = keep[t] * g
            ds0[b, h] = g
    return dq, dk, dv, ds0


def _rel_err(got, want):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _inputs(seed, b, n, h, d, dtype):
    rng = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(rng.standard_normal((b, n, h, d)) * 0.5, dtype) for _ in range(4))
    s0 = jnp.asarray(rng.standard_normal((b, h, d, d)), jnp.float32)
    dfin = jnp.asarray(rng.standard_normal((b, h, d, d)), jnp.float32)
    # Rates spanning MiniMax's range (fast-decaying head and a nearly flat one).
    decay = jnp.asarray(rng.uniform(0.005, 0.8, size=(h,)), jnp.float32)
    return q, k, v, decay, s0, do, dfin


def _random_segment_ids(seed, b, n, max_starts):
    """User-style ids (not normalized: repeated and decreasing values) with a few random segment starts per row;
    row 0 also starts a segment exactly at position 8 (a chunk boundary for the block sizes used below)."""
    rng = np.random.default_rng(seed + 1000)
    ids = np.zeros((b, n), np.int32)
    for row in range(b):
        starts = set(rng.choice(np.arange(1, n), size=rng.integers(0, max_starts + 1), replace=False).tolist())
        if row == 0:
            starts.add(8)
        cur = int(rng.integers(0, 5))
        for t in range(n):
            if t in starts:
                cur = (cur + int(rng.integers(1, 4))) % 5  # always a change; values repeat across the row
            ids[row, t] = cur
    return jnp.asarray(ids)


# ----------------------------------------------------------------------------------------------------------------
# Direct backend calls (multiple-of-block sequences, normalized segment index) vs the float64 oracle.


@pytest.mark.parametrize(
    "head_dim,block,cores",
    [
        (16, 8, 1),  # transposed layout [B, H, N, D]
        (128, 8, 1),  # in-place layout [B, N, H*D] (the production path, D = 128)
        (32, 16, 2),  # two simulated cores sharing the parallel grid axes, randomized order
    ],
)
def test_backend_matches_float64_oracle(race_log, head_dim, block, cores):
    b, h, n = 2, 2, 3 * block
    q, k, v, decay, s0, do, dfin = _inputs(7 + head_dim, b, n, h, head_dim, jnp.float32)
    seg = ops.segment_index(_random_segment_ids(3, b, n, max_starts=3))
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=cores, random_seed=cores)

    o, fin = mosaic.forward(q, k, v, decay, seg, s0, block_size=block, interpret=params)
    dq, dk, dv, ds0 = mosaic.backward(q, k, v, decay, seg, s0, do, dfin, block_size=block, interpret=params)
    jax.block_until_ready((o, fin, dq, dk, dv, ds0))
    _assert_no_races(race_log, 3)

    want_o, want_fin = np_forward(q, k, v, decay, seg, s0)
    want = np_backward(q, k, v, decay, seg, s0, do, dfin)
    assert o.dtype == jnp.float32 and fin.dtype == jnp.float32 and ds0.dtype == jnp.float32
    errs = {
        "o": _rel_err(o, want_o),
        "final_state": _rel_err(fin, want_fin),
        **{
            name: _rel_err(g, w)
            for name, g, w in zip(("dq", "dk", "dv", "dinitial_state"), (dq, dk, dv, ds0), want, strict=True)
        },
    }
    print(f"float64 oracle, head_dim {head_dim}, block {block}, cores {cores}: {errs}")
    assert max(errs.values()) < 1e-5, errs


def test_backend_rejects_ragged_sequence():
    q = jnp.zeros((1, 12, 1, 16), jnp.float32)
    with pytest.raises(ValueError, match="multiple of block_size"):
        mosaic.forward(q, q, q, jnp.ones((1,)), jnp.zeros((1, 12), jnp.int32), jnp.zeros((1, 1, 16, 16)), block_size=8)


def test_default_block_size():
    assert ops.default_block_size("mosaic") == mosaic.DEFAULT_BLOCK_SIZE == 256


# ----------------------------------------------------------------------------------------------------------------
# Through the public op (custom_vjp, tail in plain JAX, user segment ids) vs the reference backend.

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_initial_state", [True, False], ids=["init", "noinit"])
def test_op_matches_reference(race_log, dtype, with_initial_state):
    b, n, h, d, block = 2, 29, 2, 16, 8  # 3 blocks in the kernel + a 5-position tail
    seed = 11 + 2 * int(with_initial_state) + int(dtype == jnp.bfloat16)
    q, k, v, decay, s0, do, dfin = _inputs(seed, b, n, h, d, dtype)
    seg = _random_segment_ids(seed, b, n, max_starts=3)
    init = s0 if with_initial_state else None

    def run(backend, q, k, v, init):
        return ops.lightning_attention(
            q,
            k,
            v,
            decay,
            segment_ids=seg,
            initial_state=init,
            return_final_state=True,
            block_size=block,
            backend=backend,
            interpret=backend == "mosaic",
        )

    def results(backend):
        (o, fin), vjp = jax.vjp(lambda q, k, v, init: run(backend, q, k, v, init), q, k, v, init)
        return (o, fin, *vjp((do, dfin)))

    got = jax.block_until_ready(results("mosaic"))
    _assert_no_races(race_log, 3)
    want = results("reference")
    names = ("o", "final_state", "dq", "dk", "dv", "dinitial_state")
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32 and got[2].dtype == dtype
    errs = {name: _rel_err(g, w) for name, g, w in zip(names, got, want, strict=True) if w is not None}
    print(f"vs reference, {jnp.dtype(dtype).name}, initial_state {with_initial_state}: {errs}")
    assert max(errs.values()) < TOL[dtype], errs
    if dtype == jnp.float32:  # the oracle itself agrees with float64
        want_o, want_fin = np_forward(q, k, v, decay, seg, s0 if init is not None else jnp.zeros_like(s0))
        assert _rel_err(got[0], want_o) < 1e-5 and _rel_err(got[1], want_fin) < 1e-5


def test_op_in_shard_map_interpret(race_log):
    """Inside ``jax.shard_map`` (check_vma on): batch-sharded activations with a REPLICATED initial state, whose
    gradient must come back replicated (summed over the batch shards), and without an initial state (ops.py then
    builds a replicated zero state)."""
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    b, n, h, d, block = 2, 16, 2, 16, 8
    q, k, v, decay, s0, do, _ = _inputs(5, b, n, h, d, jnp.float32)
    seg = _random_segment_ids(5, b, n, max_starts=2)
    s0 = s0[:1]  # one state shared by every row: replicated over the mesh

    def loss(backend, q, k, v, s0, seg, do):
        o, fin = ops.lightning_attention(
            q,
            k,
            v,
            decay,
            segment_ids=seg,
            initial_state=None if s0 is None else jnp.broadcast_to(s0, (q.shape[0], *s0.shape[1:])),
            return_final_state=True,
            block_size=block,
            backend=backend,
            interpret=backend == "mosaic",
        )
        return jnp.sum(o * do) + jnp.sum(jnp.sin(fin))

    batch = P("data")
    sharded = jax.shard_map(
        lambda *args: jax.lax.psum(loss("mosaic", *args), "data"),
        mesh=mesh,
        in_specs=(batch, batch, batch, P(), batch, batch),
        out_specs=P(),
        check_vma=True,
    )
    for init in (s0, None):
        got = jax.jit(jax.grad(sharded, argnums=(0, 1, 2, 3)))(q, k, v, init, seg, do)
        want = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2, 3))(q, k, v, init, seg, do)
        errs = [_rel_err(g, w) for g, w in zip(got, want, strict=True) if w is not None]
        assert len(errs) == (4 if init is not None else 3) and max(errs) < 1e-5, errs
    _assert_no_races(race_log, 6)


# ----------------------------------------------------------------------------------------------------------------
# TPU lowering (jax.export) at model shapes inside shard_map over a batch-sharded mesh.

B, N, H, D, BLOCK = 4, 1024, 4, 128, 256


def _sharded_fns(mesh, state_spec):
    def attn(q, k, v, decay, seg, s0):
        # A replicated state has batch 1 and is shared by every local row.
        return ops.lightning_attention(
            q,
            k,
            v,
            decay,
            segment_ids=seg,
            initial_state=jnp.broadcast_to(s0, (q.shape[0], *s0.shape[1:])),
            return_final_state=True,
            block_size=BLOCK,
            backend="mosaic",
        )

    batch = P("data")
    fwd = jax.shard_map(attn, mesh=mesh, in_specs=(batch,) * 3 + (P(), batch, state_spec), out_specs=(batch, batch))

    def loss(q, k, v, decay, seg, s0):
        o, fin = fwd(q, k, v, decay, seg, s0)
        return jnp.sum(jnp.square(o.astype(jnp.float32))) + jnp.sum(jnp.sin(fin))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 5)))


def _state_shape(state_spec):
    return (B if state_spec == P("data") else 1, H, D, D)


def _sharded_args(mesh, dtype, state_spec):
    batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    act = jax.ShapeDtypeStruct((B, N, H, D), dtype, sharding=batch)
    return (
        act,
        act,
        act,
        jax.ShapeDtypeStruct((H,), jnp.float32, sharding=rep),
        jax.ShapeDtypeStruct((B, N), jnp.int32, sharding=batch),
        jax.ShapeDtypeStruct(_state_shape(state_spec), jnp.float32, sharding=NamedSharding(mesh, state_spec)),
    )


@pytest.mark.parametrize(
    "dtype,state_spec",
    [(jnp.bfloat16, P("data")), (jnp.float32, P())],  # the fp32 case shares one replicated initial state
    ids=["bf16-sharded_state", "fp32-replicated_state"],
)
def test_export_for_tpu_in_shard_map(dtype, state_spec):
    mesh = AbstractMesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    fwd, grad = _sharded_fns(mesh, state_spec)
    args = _sharded_args(mesh, dtype, state_spec)

    exp_fwd = jax.export.export(fwd, platforms=["tpu"])(*args)
    text = exp_fwd.mlir_module()
    assert exp_fwd.nr_devices == 4 and exp_fwd.platforms == ("tpu",)
    assert text.count("tpu_custom_call") == 1 and KERNEL_NAMES[0] in text

    exp_grad = jax.export.export(grad, platforms=["tpu"])(*args)
    text = exp_grad.mlir_module()
    assert text.count("tpu_custom_call") == 3
    assert all(name in text for name in KERNEL_NAMES)
    assert [a.shape for a in exp_grad.out_avals] == [(B, N, H, D)] * 3 + [_state_shape(state_spec)]
    # The replicated state's gradient is summed over the batch shards (one all-reduce), a sharded one is not.
    assert text.count("all_reduce") == (1 if state_spec == P() else 0)


def test_export_block_sizes_and_head_dims():
    """Block 64/128/512 and head_dim 64 (transposed layout) also lower (forward and backward kernels)."""
    for block, d in ((64, 128), (128, 128), (512, 128), (128, 64)):
        q = jax.ShapeDtypeStruct((2, 1024, 2, d), jnp.bfloat16)
        seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
        st = jax.ShapeDtypeStruct((2, 2, d, d), jnp.float32)
        dec = jax.ShapeDtypeStruct((2,), jnp.float32)
        f = jax.jit(lambda *a, bs=block: mosaic.forward(*a, block_size=bs))
        g = jax.jit(lambda *a, bs=block: mosaic.backward(*a, block_size=bs))
        assert "tpu_custom_call" in jax.export.export(f, platforms=["tpu"])(q, q, q, dec, seg, st).mlir_module()
        text = jax.export.export(g, platforms=["tpu"])(q, q, q, dec, seg, st, q, st).mlir_module()
        assert text.count("tpu_custom_call") == 2


# ----------------------------------------------------------------------------------------------------------------
# Optional: AOT compile for real TPU generations (needs libtpu; no TPU required).


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_compile_for_tpu_topology(topology):
    from jax.experimental import topologies
    from jax.sharding import Mesh

    topo = topologies.get_topology_desc(topology, "tpu")
    mesh = Mesh(np.asarray(topo.devices), ("data",))
    fwd, grad = _sharded_fns(mesh, P("data"))
    args = _sharded_args(mesh, jnp.bfloat16, P("data"))
    t0 = time.perf_counter()
    fwd.lower(*args).compile()
    grad.lower(*args).compile()
    print(f"{topology}: compiled forward + grad in {time.perf_counter() - t0:.1f} s")
