"""Shared pieces of the two converter scripts: resolving ``--config`` and the dry-run printout."""

from __future__ import annotations

import os

from jax.sharding import AbstractMesh

from minimax_jax.config import PRESETS, ModelConfig, get_preset
from minimax_jax.convert.plan import conversion_plan, format_plan


def resolve_config(value: str | None, fallback_folder: str | None) -> ModelConfig:
    """``--config``: a preset name (e.g. ``minimax_text_01``), a config.json or a folder; else the fallback's."""
    if value in PRESETS:
        return get_preset(value)
    path = value or fallback_folder
    if not path:
        raise ValueError("no config: pass --config (a preset name or a config.json path)")
    return ModelConfig.from_json(path)


def dry_run_text(config: ModelConfig, dtype: str, mesh: AbstractMesh | None) -> str:
    """The full mapping and target shardings for ``config`` (reads no tensor data)."""
    return format_plan(conversion_plan(config, dtype, mesh), mesh)


def folder_of(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path)
