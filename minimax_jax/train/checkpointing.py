"""Orbax checkpoints of a training run: params, optimizer state, step + RNG, and the data iterator.

Layout of ``<workdir>/checkpoints/<step>/`` (one ``ocp.args.Composite`` per step):

- ``params``: ``ocp.args.StandardSave`` of the model's ``nnx.Param`` values as a plain nested dict with string
  keys, the path of each weight in the model (``{"embed_tokens": ..., "groups": {"layers": {"0": {"mixer":
  {"qkv_proj": ...}}}}, "final_norm": {"weight": ...}, "lm_head": ...}``), i.e. ``nnx.to_pure_dict(
  nnx.state(model, nnx.Param))`` with integer keys written as strings. Layer-group weights carry a leading
  ``num_layer_groups`` axis (the scanned stack). fp32 master weights. A converter can read or write this item alone
  with ``ocp.StandardCheckpointer`` on ``<step>/params``.
- ``opt_state``: the optax state pytree (``StandardSave``).
- ``train_state``: ``{"step": int32, "rng": uint32 key data}``.
- ``data``: this process's data iterator position, written by grain's handler as
  ``process_<i>-of-<n>.json`` (``grain.checkpoint.CheckpointSave``).

Saves are asynchronous (``checkpoint.async_save``): the arrays are copied off the device and written in the
background while training continues. Orbax writes each step into a temporary ``<step>.orbax-checkpoint-tmp*``
folder and renames it to ``<step>`` only after every item is complete, so a run killed during a save leaves no
``<step>`` folder and resumes from the last complete one (leftover temporary folders are deleted on restart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from minimax_jax.train.config import CheckpointConfig
from minimax_jax.train.step import TrainState


def stringify_keys(tree: Any) -> Any:
    """Nested dicts with every key as a string (orbax paths; integer keys come from ``nnx.List``)."""
    if isinstance(tree, dict):
        return {str(key): stringify_keys(value) for key, value in tree.items()}
    return tree


def restore_keys(template: Any, tree: Any) -> Any:
    """``tree`` (string keys) with the keys of ``template`` (e.g. integer layer indices) restored."""
    if isinstance(template, dict):
        return {key: restore_keys(value, tree[str(key)]) for key, value in template.items()}
    return tree


class CheckpointMismatchError(ValueError):
    """A checkpoint whose parameters are not this model's (another config, or an older parameter layout)."""


def _param_names(tree: Any) -> set[str]:
    return {".".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: not isinstance(x, dict))[0]}


def check_params_match(params_dir: Path, params_like: Any, shown: int = 8) -> None:
    """Raises ``CheckpointMismatchError`` if the parameter names saved in ``params_dir`` differ from
    ``params_like``'s, listing up to ``shown`` missing and unexpected names."""
    saved = _param_names(ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree)
    wanted = _param_names(stringify_keys(params_like))
    if saved == wanted:
        return
    missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)

    def listed(names):
        return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")

    raise CheckpointMismatchError(
        f"checkpoint {params_dir} does not hold this model's parameters: {len(missing)} missing "
        f"({listed(missing)}), {len(unexpected)} unexpected ({listed(unexpected)}). Checkpoints written before "
        "the MoE stored W1 and W3 stacked hold moe.w1 and moe.w3 where the model has moe.w13.")


class Checkpointer:
    """Saves and restores ``TrainState`` plus the data iterator under ``directory``."""

    def __init__(self, directory: str | Path, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.max_to_keep, enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True, create=True)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete (finalized) checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, data_iterator: Any) -> None:
        """Starts saving ``state`` at its step (returns before the write finishes when saves are async)."""
        step = int(jax.device_get(state["step"]))
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(stringify_keys(state["params"])),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            train_state=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        ), force=True)

    def restore(self, step: int, like: TrainState, data_iterator: Any) -> TrainState:
        """The state saved at ``step``, placed like ``like`` (shapes, dtypes, shardings); moves ``data_iterator``.

        Raises ``CheckpointMismatchError`` naming the parameters that the checkpoint lacks or has in excess (orbax's
        own error lists every optimizer-state leaf too); nothing on disk is changed.
        """
        check_params_match(self.directory / str(step) / "params", like["params"])
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(stringify_keys(abstract["params"])),
            opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
            train_state=ocp.args.StandardRestore({"step": abstract["step"], "rng": abstract["rng"]}),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        return {"params": restore_keys(like["params"], restored["params"]), "opt_state": restored["opt_state"],
                "step": restored["train_state"]["step"], "rng": restored["train_state"]["rng"]}

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
