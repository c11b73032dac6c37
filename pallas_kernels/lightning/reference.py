"""Oracle: the token-by-token ``lax.scan`` recurrence of lightning attention (fp32 state, JAX autodiff).

``S_t = keep_t * exp(-s) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``, where ``keep_t = 0`` at a segment start
(a position whose segment id differs from the previous position's) and 1 elsewhere; ``S_{-1}`` is the initial
state, so it reaches the row's first segment only. Slow (T sequential steps) but obviously right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def lightning_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(o, final_state)``; q, k, v ``[B, T, H, D]``, decay ``[H]``, state fp32 ``[B, H, D, D]``."""
    b, t, h, d = q.shape
    hi = lax.Precision.HIGHEST
    qf, kf, vf = (x.astype(jnp.float32).transpose(1, 0, 2, 3) for x in (q, k, v))  # [T, B, H, D]
    if segment_ids is None:
        keep = jnp.ones((t, b), jnp.float32)
    else:
        starts = segment_ids[:, 1:] != segment_ids[:, :-1]
        keep = jnp.concatenate([jnp.ones((b, 1), bool), ~starts], axis=1).astype(jnp.float32).T  # [T, B]
    state = jnp.zeros((b, h, d, d), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    step_decay = jnp.exp(-decay.astype(jnp.float32))[None, :, None, None]  # [1, H, 1, 1]

    def step(s, xs):
        q_t, k_t, v_t, keep_t = xs
        s = s * (keep_t[:, None, None, None] * step_decay) + jnp.einsum("bhd,bhe->bhde", k_t, v_t, precision=hi)
        return s, jnp.einsum("bhd,bhde->bhe", q_t, s, precision=hi)

    final, o = lax.scan(step, state, (qf, kf, vf, keep))
    return o.transpose(1, 0, 2, 3).astype(q.dtype), final
