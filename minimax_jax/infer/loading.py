"""Load a model for inference from a Hugging Face folder or from the trainer's orbax checkpoints.

Orbax layout (``minimax_jax/train/checkpointing.py``): ``<workdir>/checkpoints/<step>/params`` holds
``nnx.state(model, nnx.Param)`` as a pure dict with string keys. It carries no model config, so the caller names
one (the run's config file or a preset). Accepted paths: the step folder, the ``checkpoints`` folder or the
workdir (the newest step is taken from the last two).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.checkpoint import from_pretrained
from minimax_jax.config import ModelConfig
from minimax_jax.model.transformer import MiniMaxForCausalLM


def is_huggingface_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def orbax_params_dir(path: str | Path) -> Path:
    """The ``<step>/params`` folder that ``path`` (step folder, checkpoints folder or workdir) points at."""
    path = Path(path)
    if (path / "params").is_dir():
        return path / "params"
    for root in (path, path / "checkpoints"):
        steps = sorted((int(p.name), p) for p in root.glob("*") if p.is_dir() and p.name.isdigit())
        if steps and (steps[-1][1] / "params").is_dir():
            return steps[-1][1] / "params"
    raise FileNotFoundError(f"{path}: neither a Hugging Face folder (config.json) nor an orbax checkpoint "
                            "(<step>/params, <checkpoints>/<step>/params or <workdir>/checkpoints/<step>/params)")


def load_orbax_params(model: MiniMaxForCausalLM, params_dir: str | Path) -> MiniMaxForCausalLM:
    """Overwrites ``model``'s parameters with those saved by the trainer (cast to the model's param dtypes)."""
    import orbax.checkpoint as ocp

    from minimax_jax.train.checkpointing import restore_keys, stringify_keys

    state = nnx.state(model, nnx.Param)
    like = nnx.to_pure_dict(state)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), like)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(Path(params_dir).absolute(), stringify_keys(target))
    restored = jax.tree.map(lambda new, old: new.astype(old.dtype), restore_keys(like, restored), like)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def load_model(checkpoint: str | Path, *, dtype=jnp.float32,
               orbax_config: ModelConfig | None = None) -> tuple[MiniMaxForCausalLM, str]:
    """A model from ``checkpoint`` and a one-line description of where it came from.

    A folder with ``config.json`` is read as Hugging Face safetensors; anything else as an orbax checkpoint of
    the trainer, which needs ``orbax_config``.
    """
    if is_huggingface_folder(checkpoint):
        return from_pretrained(checkpoint, dtype=dtype), f"Hugging Face checkpoint {checkpoint}"
    params_dir = orbax_params_dir(checkpoint)
    if orbax_config is None:
        raise ValueError(f"{params_dir} is an orbax checkpoint, which stores no model config: pass the run's "
                         "config file (--train_config) or a --preset")
    model = MiniMaxForCausalLM(orbax_config, dtype=dtype, rngs=nnx.Rngs(0))
    return load_orbax_params(model, params_dir), f"orbax checkpoint {params_dir}"
