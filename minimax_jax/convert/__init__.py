"""Checkpoint conversion: official / transformers safetensors <-> orbax checkpoints in the trainer's layout.

Streaming both ways (one official tensor in host memory at a time); see ``hf_to_orbax``, ``orbax_to_hf``,
``plan`` (the dry-run mapping and target shardings) and ``layout`` (restoring a converted checkpoint on a mesh).
"""

from minimax_jax.convert.hf_to_orbax import ConversionReport, convert_hf_to_orbax, validate_source
from minimax_jax.convert.layout import load_model, params_dir, restore_params
from minimax_jax.convert.orbax_to_hf import convert_orbax_to_hf
from minimax_jax.convert.plan import conversion_plan, format_plan, parse_mesh

__all__ = ["ConversionReport", "conversion_plan", "convert_hf_to_orbax", "convert_orbax_to_hf", "format_plan",
           "load_model", "params_dir", "parse_mesh", "restore_params", "validate_source"]
