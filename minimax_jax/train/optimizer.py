"""AdamW with linear warmup and cosine decay, global-norm gradient clipping (optax)."""

from __future__ import annotations

import jax
import optax

from minimax_jax.train.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
    """0 -> ``learning_rate`` linearly over ``warmup_steps``, then cosine to ``end_lr_ratio * learning_rate``."""
    decay_steps = config.decay_steps or num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=max(decay_steps, config.warmup_steps + 1), end_value=config.learning_rate * config.end_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices only: norm scales (1-D) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if configured) then AdamW on the schedule."""
    adamw = optax.adamw(learning_rate=learning_rate_schedule(config, num_steps), b1=config.b1, b2=config.b2,
                        eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip_norm is None:
        return adamw
    return optax.chain(clip_by_global_norm(config.grad_clip_norm), adamw)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` (same formula, same empty state) that takes the norm as the extra argument
    ``global_norm`` when the caller has it: the train step computes it for its metrics, and computing it again
    here read every gradient once more per step. Without ``global_norm`` it computes the norm itself."""

    def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        keep = norm < max_norm
        return jax.tree.map(lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def update_count(opt_state) -> jax.Array | None:
    """How many updates the optimizer has applied (skipped non-finite steps do not count); None if it keeps none."""
    counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
              if path and getattr(path[-1], "name", None) == "count"]
    return counts[0] if counts else None
