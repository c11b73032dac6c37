"""Grouped matmul over tile-aligned row groups (MoE experts): XLA, Pallas-Triton and Mosaic-GPU (Hopper) backends,
and the experts' weighted SwiGLU fused onto it."""

from pallas_kernels.grouped_matmul.ops import BACKENDS, grouped_matmul, grouped_swiglu, resolve_backend, tile_rows
from pallas_kernels.grouped_matmul.swiglu import weighted_swiglu, weighted_swiglu_grad

__all__ = ["BACKENDS", "grouped_matmul", "grouped_swiglu", "resolve_backend", "tile_rows", "weighted_swiglu",
           "weighted_swiglu_grad"]
