"""Grouped matmul over tile-aligned row groups (MoE experts) with XLA and Pallas-Triton backends."""

from pallas_kernels.grouped_matmul.ops import BACKENDS, grouped_matmul, resolve_backend, tile_rows

__all__ = ["BACKENDS", "grouped_matmul", "resolve_backend", "tile_rows"]
