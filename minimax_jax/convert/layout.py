"""Where a converted checkpoint's pieces live, and restoring its params onto a mesh.

A converted checkpoint is a ``CheckpointManager`` directory like a training run's ``checkpoints/`` folder:
``<root>/<step>/params`` holds the model's ``nnx.Param`` values in the trainer's layout (``StandardRestore`` of
``stringify_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))``, stacked layer groups and experts) and
``<root>/config.json`` the official-format model config. Restoring reads each shard straight onto its device.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from minimax_jax.config import ModelConfig
from minimax_jax.convert.plan import abstract_params, conversion_plan
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.train.checkpointing import restore_keys

PARAMS_ITEM = "params"
CONFIG_FILE = "config.json"


def latest_step(root: str) -> int | None:
    """The newest finalized step folder under ``root`` (orbax's temporary folders never count)."""
    steps = [int(name) for name in os.listdir(root) if name.isdigit()
             and os.path.isdir(os.path.join(root, name, PARAMS_ITEM))] if os.path.isdir(root) else []
    return max(steps) if steps else None


def params_dir(path: str, step: int | None = None) -> str:
    """The ``params`` item folder for ``path``: a checkpoint root (latest or given step), a step, or the item."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "_METADATA")):
        return path
    if os.path.exists(os.path.join(path, PARAMS_ITEM, "_METADATA")):
        return os.path.join(path, PARAMS_ITEM)
    step = latest_step(path) if step is None else step
    candidate = os.path.join(path, str(step), PARAMS_ITEM)
    if step is None or not os.path.exists(os.path.join(candidate, "_METADATA")):
        raise FileNotFoundError(f"no finalized orbax params checkpoint at {path} (step {step})")
    return candidate


def write_config(root: str, config: ModelConfig) -> None:
    """Writes the official-format config.json next to the step folders (atomically)."""
    tmp = os.path.join(root, f".{CONFIG_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(config.to_official_dict(), f, indent=2)
    os.replace(tmp, os.path.join(root, CONFIG_FILE))


def restore_params(path: str, config: ModelConfig, *, dtype=jnp.float32, mesh: Mesh | None = None,
                   step: int | None = None) -> dict:
    """The model's params (pure dict, integer layer keys, as ``nnx.to_pure_dict``) read from ``path`` in ``dtype``.

    With ``mesh``, every parameter is read directly into its ``NamedSharding`` from the logical axis rules of
    ``parallel.sharding`` (each device reads only its shard); without, onto the default device.
    """
    plans = conversion_plan(config, dtype, mesh)
    sharding_of = None if mesh is None else (lambda plan: NamedSharding(mesh, plan.spec))
    restored = ocp.StandardCheckpointer().restore(params_dir(path, step), abstract_params(plans, sharding_of))
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, dtype=dtype, param_dtype=dtype))
    return restore_keys(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), restored)


def load_model(path: str, config: ModelConfig | None = None, *, dtype=jnp.float32, mesh: Mesh | None = None,
               step: int | None = None) -> MiniMaxForCausalLM:
    """A model with the params of a converted (or training) checkpoint; config from ``<path>/config.json``."""
    config = ModelConfig.from_json(path) if config is None else config
    params = restore_params(path, config, dtype=dtype, mesh=mesh, step=step)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MiniMaxForCausalLM(config, dtype=dtype, param_dtype=dtype)))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
