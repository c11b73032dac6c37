"""Names that remat policies can select: outputs of custom kernels (Pallas calls), which the dot-saving policies do
not see as matmuls and so would recompute in the backward pass."""

from jax.ad_checkpoint import checkpoint_name

KERNEL_OUTPUT = "kernel_output"  # MoE grouped-matmul outputs, the lightning recurrence's output

__all__ = ["KERNEL_OUTPUT", "checkpoint_name"]
