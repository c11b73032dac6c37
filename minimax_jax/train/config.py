"""Typed training config: frozen dataclasses, validated on construction, with dotted command-line overrides.

A run config is a ``TrainConfig`` built by a Python file's ``get_config()`` (``configs/tiny.py``...). Overrides
``{"optimizer.learning_rate": "1e-3", "model.num_hidden_layers": "4"}`` replace fields by their dotted path; the
string is parsed by the field's type annotation. An unknown key is an error that names it and lists the known
keys at that level, so a typo never silently does nothing.

Overriding ``model.num_hidden_layers`` without ``model.attn_type_list`` repeats the current layer-group pattern
(e.g. tiny's 3+1) to the new depth.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from minimax_jax.config import ModelConfig
from minimax_jax.data.pipeline import DataConfig
from minimax_jax.model.transformer import REMAT_POLICIES as MODEL_REMAT_POLICIES
from minimax_jax.parallel.mesh import MeshConfig

REMAT_POLICIES = tuple(MODEL_REMAT_POLICIES)
DTYPES = ("float32", "bfloat16")


class ConfigOverrideError(ValueError):
    """An override names an unknown key or carries a value of the wrong type; the message names the key."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``end_lr_ratio * learning_rate``; global-norm clipping."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: the run's num_steps
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (ndim >= 2), not to norm scales
    grad_clip_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"optimizer.decay_steps must be >= 1 or None, got {self.decay_steps}")
        if not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"optimizer.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"optimizer.grad_clip_norm must be positive or None, got {self.grad_clip_norm}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<workdir>/checkpoints``: every ``every_steps`` steps and at the end."""

    every_steps: int = 500
    max_to_keep: int = 3
    async_save: bool = True
    resume: bool = True  # restore the latest complete checkpoint of the workdir when there is one

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.max_to_keep < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.max_to_keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs besides the workdir."""

    model: ModelConfig
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    seq_len: int = 1024
    global_batch_size: int = 8  # rows per optimizer step, over all processes and micro-batches
    grad_accum_steps: int = 1  # micro-batches per step (each global_batch_size // grad_accum_steps rows)
    num_steps: int = 1000
    seed: int = 0  # parameter init
    compute_dtype: str = "bfloat16"  # matmul dtype; master weights and optimizer state stay in param_dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # per layer group: see model.transformer.REMAT_POLICIES
    scan_layers: bool = True  # False unrolls the loop over layer groups: faster steps, more memory, longer compiles
    loss_chunk_size: int | None = None  # sequence chunk of the cross-entropy (None: whole-batch fp32 logits)
    skip_nonfinite_updates: bool = True  # NaN/inf loss or gradient: keep params and optimizer state, log it
    data_shards: int | None = None  # document shards of the global batch (None: process count); fix it to make
    #                                 the data order independent of the number of processes
    log_every_steps: int = 10
    peak_flops_per_device: float = 989e12  # for MFU: H100 SXM dense bf16
    sample_prompt: str = "def "
    sample_new_tokens: int = 64  # greedy sample printed after training (0: none)
    profile_steps: int = 0  # trace this many steps (after 3 warm-up steps) into <workdir>/profile; see
    #                         scripts/trace_summary.py

    def __post_init__(self) -> None:
        for name in ("seq_len", "global_batch_size", "grad_accum_steps", "num_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.grad_accum_steps:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"grad_accum_steps ({self.grad_accum_steps})")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.loss_chunk_size is not None and (self.loss_chunk_size < 1 or self.seq_len % self.loss_chunk_size):
            raise ValueError(f"loss_chunk_size ({self.loss_chunk_size}) must divide seq_len ({self.seq_len})")
        if self.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds model.max_position_embeddings "
                             f"({self.model.max_position_embeddings})")
        if self.data_shards is not None and (self.data_shards < 1 or self.global_batch_size % self.data_shards):
            raise ValueError(f"data_shards ({self.data_shards}) must divide global_batch_size "
                             f"({self.global_batch_size})")
        if self.peak_flops_per_device <= 0:
            raise ValueError(f"peak_flops_per_device must be positive, got {self.peak_flops_per_device}")


# ---------------------------------------------------------------------- loading and overrides
def load_config_file(path: str | Path) -> TrainConfig:
    """Runs ``get_config()`` of a config file (``configs/tiny.py``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config() function")
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{path}: get_config() must return a TrainConfig, got {type(config).__name__}")
    return config


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``config`` with dotted-path fields replaced; string values are parsed by the field type.

    Overrides of fields of one object are applied together, so fields validated jointly (``mesh.axis_names`` and
    ``mesh.axis_sizes``) can change together.
    """
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigOverrideError(f"config key {key!r} conflicts with another override")
        node[leaf] = (key, value)
    return _replace_fields(config, tree, "")


def _replace_fields(obj: Any, tree: dict[str, Any], prefix: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigOverrideError(f"config key {prefix.rstrip('.')!r}: {type(obj).__name__} has no sub-fields "
                                  f"({', '.join(prefix + k for k in tree)})")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for name, sub in tree.items():
        if name not in names:
            key = sub[0] if isinstance(sub, tuple) else prefix + name
            raise ConfigOverrideError(f"unknown config key {key!r}: {type(obj).__name__} has no field {name!r} "
                                      f"(known: {', '.join(names)})")
        if isinstance(sub, dict):
            changes[name] = _replace_fields(getattr(obj, name), sub, f"{prefix}{name}.")
        else:
            changes[name] = _parse_value(sub[1], hints[name], sub[0])
    keys = ", ".join(prefix + name for name in tree)
    if isinstance(obj, ModelConfig) and "num_hidden_layers" in changes and "attn_type_list" not in changes:
        if changes["num_hidden_layers"] != obj.num_hidden_layers:
            changes["attn_type_list"] = _retiled_pattern(obj, changes["num_hidden_layers"], keys)
    try:
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError) as e:
        raise ConfigOverrideError(f"config key(s) {keys}: {e}") from e


def _retiled_pattern(model: ModelConfig, num_layers: int, full_key: str) -> tuple[int, ...]:
    pattern = model.group_pattern
    if num_layers % len(pattern):
        raise ConfigOverrideError(f"config key {full_key!r}: {num_layers} layers is not a multiple of the layer "
                                  f"group {pattern}; also override model.attn_type_list")
    return pattern * (num_layers // len(pattern))


def _parse_value(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (a string from the command line, or already typed) as an instance of ``annotation``."""
    if not isinstance(value, str):
        return value
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if type(None) in options and value.strip().lower() in ("none", "null"):
        return None
    errors = []
    for option in (o for o in options if o is not type(None)):
        try:
            return _parse_as(value, option)
        except (ValueError, SyntaxError) as e:
            errors.append(str(e))
    raise ConfigOverrideError(f"config key {key!r}: cannot read {value!r} as {annotation}: {'; '.join(errors)}")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _parse_as(text: str, kind: Any) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"not a bool: {text!r}")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    if typing.get_origin(kind) is tuple:
        (item_kind, *_) = typing.get_args(kind)
        stripped = text.strip()
        if stripped.startswith(("(", "[")):
            items = ast.literal_eval(stripped)
            return tuple(_parse_as(str(item), item_kind) for item in items)
        return tuple(_parse_as(item.strip(), item_kind) for item in stripped.split(",") if item.strip())
    raise ValueError(f"unsupported field type {kind}")
