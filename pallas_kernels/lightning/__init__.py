"""Lightning attention (MiniMax-01 decayed linear attention) with reference, XLA and Pallas backends."""

from pallas_kernels.lightning.ops import BACKENDS, lightning_attention

__all__ = ["BACKENDS", "lightning_attention"]
