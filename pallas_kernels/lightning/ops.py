"""Public entry point of lightning attention: validation, tail handling, backend dispatch, custom_vjp.

``lightning_attention`` computes, per batch row and head with decay rate ``s = decay[h]``::

    o_t = sum_{tau <= t, same segment} exp(-s (t - tau)) (q_t . k_tau) v_tau      (no scale, no normalizer)

i.e. the recurrence ``S_t = exp(-s) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` with an fp32 state ``S`` of shape
``[D, D]``.

Semantics decided here (every backend follows them):

* ``segment_ids`` ``[B, T]`` int: a position whose id differs from the previous position's starts a new segment;
  the state is reset to zero before that position. Ids need not be sorted or unique per row (``0 0 1 1 0`` is three
  segments).
* ``initial_state`` ``[B, H, D, D]`` fp32 is the state before position 0; it applies to the FIRST segment of each
  row only (a later segment starts from zero).
* ``final_state`` is the fp32 state after position ``T - 1``: it holds the last segment only (plus the decayed
  initial state when the row is a single segment). Passing it as ``initial_state`` of the continuation (whose first
  segment id equals the last id here) is exact: chunked prefill and decode are legitimate.
* Gradients flow to ``q``, ``k``, ``v`` and ``initial_state``. ``decay`` gets a ZERO cotangent and
  ``segment_ids`` none (they are treated as constants; MiniMax decays are fixed, not trained).

CONTRACT FOR PALLAS BACKENDS (``triton_backend.py``, ``mosaic.py``). A backend module exposes::

    DEFAULT_BLOCK_SIZE: int            # optional; the block used when the caller passes block_size=None
    forward(q, k, v, decay, segment_ids, initial_state, *, block_size, interpret) -> (o, final_state)
    backward(q, k, v, decay, segment_ids, initial_state, do, dfinal_state, *, block_size, interpret)
        -> (dq, dk, dv, dinitial_state)

Inputs are already validated by this module and satisfy:

* ``q, k, v`` ``[B, T, H, D]``, one dtype (bf16 or fp32); ``T`` is a positive MULTIPLE of ``block_size``.
  There is NO padding: this module runs the backend on the longest multiple-of-block prefix ``T0`` and computes
  the ``< block_size`` tail with the plain-JAX ``xla`` implementation, chaining the prefix's final state into the
  tail as its initial state (and the tail's state gradient back into the prefix's ``dfinal_state``). So no padded
  position ever exists: the final state is never decayed by padding and padding never leaks into outputs.
* ``decay`` ``[H]`` fp32, ``decay >= 0`` (typical 1e-3 .. 1). Use only non-positive exponents ``exp(-s * n)``,
  ``n >= 0``, so that nothing overflows.
* ``segment_ids`` int32 ``[B, T]`` is a NORMALIZED SEGMENT INDEX, never None: non-decreasing along each row,
  ``0`` at every position of the row's first segment, ``+1`` at each segment start. Two positions are in one
  segment iff their indices are equal. ``initial_state`` applies to positions with index ``0`` only. (This module
  converts user ids with ``segment_index``; for the tail it re-bases the index so that the tail's positions that
  continue the prefix's last segment get index 0.)
* ``initial_state`` fp32 ``[B, H, D, D]``, never None (zeros when the caller passed none).
* ``final_state`` / ``dfinal_state``: fp32 ``[B, H, D, D]``, the state after position ``T - 1``.
* ``o``, ``dq``, ``dk``, ``dv`` have the dtype of ``q``; ``dinitial_state`` is fp32. No gradient for ``decay``
  and ``segment_ids`` is returned. Accumulate in fp32 (state and all matmul accumulators).

The ``reference`` backend is the oracle (``lax.scan`` recurrence on user segment ids, differentiated by JAX
autodiff); every other backend goes through one ``custom_vjp`` here, whose backward calls ``backend.backward``
(the ``xla`` backend's backward recomputes its forward under ``jax.vjp``, which keeps memory low).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels.lightning import reference as _reference
from pallas_kernels.lightning import xla as _xla

BACKENDS = ("auto", "reference", "xla", "triton", "mosaic")
_MODULES = {"xla": "pallas_kernels.lightning.xla", "triton": "pallas_kernels.lightning.triton_backend",
            "mosaic": "pallas_kernels.lightning.mosaic"}
_FALLBACK_BLOCK = {"xla": 256, "triton": 64, "mosaic": 256}


def _backend_module(name: str) -> ModuleType:
    """Imports a backend lazily (so a missing ``mosaic.py`` breaks nothing until it is asked for)."""
    return importlib.import_module(_MODULES[name])


def default_block_size(backend: str) -> int:
    """The block length a backend uses when ``block_size`` is None."""
    if backend == "reference":
        return 1  # unused: the reference is token by token
    if backend == "xla":
        return _xla.DEFAULT_BLOCK_SIZE
    try:
        mod = _backend_module(backend)
    except ImportError:
        return _FALLBACK_BLOCK[backend]
    return int(getattr(mod, "DEFAULT_BLOCK_SIZE", _FALLBACK_BLOCK[backend]))


def resolve_backend(backend: str) -> str:
    """Maps ``auto`` to the platform's backend: gpu -> triton, tpu -> mosaic, anything else -> xla."""
    if backend not in BACKENDS:
        raise ValueError(f"lightning_attention: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    return {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}.get(platform, "xla")


def segment_index(segment_ids: jax.Array) -> jax.Array:
    """User segment ids ``[B, T]`` -> normalized int32 index: 0 on the first segment, +1 at every id change."""
    starts = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(starts[:, :1]), jnp.cumsum(starts, axis=1)], axis=1)


def _validate(q, k, v, decay, segment_ids, initial_state, block_size) -> None:
    """Raises ValueError naming the first problem with the arguments."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"lightning_attention: {name} must have rank 4 [batch, seq, heads, head_dim], "
                             f"got shape {getattr(x, 'shape', None)}")
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"lightning_attention: {name} must be bf16, fp16 or fp32, got {x.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"lightning_attention: q, k, v shapes must match, got {q.shape}, {k.shape}, {v.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"lightning_attention: q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, t, h, d = q.shape
    if t < 1:
        raise ValueError("lightning_attention: sequence length must be >= 1")
    if getattr(decay, "shape", None) != (h,):
        raise ValueError(f"lightning_attention: decay must have shape [heads] = ({h},), "
                         f"got {getattr(decay, 'shape', None)}")
    if not jnp.issubdtype(decay.dtype, jnp.floating):
        raise ValueError(f"lightning_attention: decay must be floating point, got {decay.dtype}")
    if segment_ids is not None:
        if getattr(segment_ids, "shape", None) != (b, t):
            raise ValueError(f"lightning_attention: segment_ids must have shape [batch, seq] = ({b}, {t}), "
                             f"got {getattr(segment_ids, 'shape', None)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"lightning_attention: segment_ids must be integer, got {segment_ids.dtype}")
    if initial_state is not None:
        if getattr(initial_state, "shape", None) != (b, h, d, d):
            raise ValueError(f"lightning_attention: initial_state must have shape [batch, heads, head_dim, "
                             f"head_dim] = ({b}, {h}, {d}, {d}), got {getattr(initial_state, 'shape', None)}")
        if initial_state.dtype != jnp.float32:
            raise ValueError(f"lightning_attention: initial_state must be float32, got {initial_state.dtype}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"lightning_attention: block_size must be a positive int or None, got {block_size!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _blocked(q, k, v, decay, seg_idx, initial_state, backend, block_size, interpret):
    """``backend.forward`` on a multiple-of-block sequence, differentiable through ``backend.backward``."""
    return _backend_module(backend).forward(q, k, v, decay, seg_idx, initial_state, block_size=block_size,
                                            interpret=interpret)


def _blocked_fwd(q, k, v, decay, seg_idx, initial_state, backend, block_size, interpret):
    out = _blocked(q, k, v, decay, seg_idx, initial_state, backend, block_size, interpret)
    return out, (q, k, v, decay, seg_idx, initial_state)


def _blocked_bwd(backend, block_size, interpret, res, cotangents):
    q, k, v, decay, seg_idx, initial_state = res
    do, dfinal = cotangents
    dq, dk, dv, dinit = _backend_module(backend).backward(
        q, k, v, decay, seg_idx, initial_state, do.astype(q.dtype), dfinal.astype(jnp.float32),
        block_size=block_size, interpret=interpret)
    return dq, dk, dv, jnp.zeros_like(decay), None, dinit


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    block_size: int | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Decayed linear attention of MiniMax-01 (see the module docstring for semantics).

    Args:
      q, k, v: ``[batch, seq, heads, head_dim]``, bf16 or fp32 (one dtype); the output has q's dtype.
      decay: ``[heads]`` fp32 decay rates ``s > 0``; gets a zero gradient.
      segment_ids: optional ``[batch, seq]`` int ids of packed sequences; gets no gradient.
      initial_state: optional fp32 ``[batch, heads, head_dim, head_dim]`` state before position 0 (first segment).
      return_final_state: also return the fp32 state after the last position.
      block_size: block length of the blocked backends (None: the backend's default).
      backend: ``auto`` | ``reference`` | ``xla`` | ``triton`` | ``mosaic``.
      interpret: run a Pallas backend in interpret mode (CPU).
    Returns:
      ``o`` or ``(o, final_state)``.
    """
    _validate(q, k, v, decay, segment_ids, initial_state, block_size)
    name = resolve_backend(backend)
    block = block_size if block_size is not None else default_block_size(name)
    o, final = _lightning(q, k, v, decay.astype(jnp.float32), segment_ids, initial_state, name, block, interpret)
    return (o, final) if return_final_state else o


def _zero_state_like(q: jax.Array) -> jax.Array:
    """fp32 zeros ``[B, H, D, D]``, under a mesh with Explicit axes sharded over batch and heads like ``q``."""
    b, _, h, d = q.shape
    sharding = jax.typeof(q).sharding
    if isinstance(sharding, jax.sharding.NamedSharding) and jax.sharding.AxisType.Explicit in sharding.mesh.axis_types:
        spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
        return jnp.zeros((b, h, d, d), jnp.float32, out_sharding=jax.sharding.PartitionSpec(spec[0], spec[2]))
    return jnp.zeros((b, h, d, d), jnp.float32)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _lightning(q, k, v, decay, segment_ids, initial_state, name, block, interpret):
    """Jitted body of ``lightning_attention`` on validated arguments: ``(o, final_state)``."""
    if name == "reference":
        return _reference.lightning_attention_reference(q, k, v, decay, segment_ids=segment_ids,
                                                        initial_state=initial_state)
    b, t, h, d = q.shape
    if segment_ids is None:
        seg_idx = jnp.zeros((b, t), jnp.int32)
    else:
        seg_idx = segment_index(segment_ids)
    state = initial_state if initial_state is not None else _zero_state_like(q)
    t0 = (t // block) * block
    outs = []
    if t0 > 0:
        o, state = _blocked(q[:, :t0], k[:, :t0], v[:, :t0], decay, seg_idx[:, :t0], state, name, block, interpret)
        outs.append(o)
    if t0 < t:
        tail_idx = seg_idx[:, t0:] - (seg_idx[:, t0 - 1 : t0] if t0 > 0 else 0)
        o, state = _blocked(q[:, t0:], k[:, t0:], v[:, t0:], decay, tail_idx, state, "xla", t - t0, False)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return o, state
