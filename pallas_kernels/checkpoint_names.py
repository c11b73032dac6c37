"""Names for ``jax.ad_checkpoint.checkpoint_name`` that remat policies select: outputs of custom kernels (Pallas
calls), which the dot-saving policies do not see as matmuls and so would recompute in the backward pass."""

KERNEL_OUTPUT = "kernel_output"  # MoE grouped-matmul outputs, the lightning recurrence's output
