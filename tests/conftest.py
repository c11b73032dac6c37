"""Suite-wide settings: fp32 parity is checked at full fp32 matmul precision on every platform (on GPUs XLA's
default for fp32 matmuls is TF32, ~1e-3 relative, which would hide real errors or fail true ones)."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
