"""The CPU default: the tiny preset on the built-in corpus with the byte tokenizer, a few minutes on 2 cores.

fp32 compute (bf16 matmuls are emulated, slowly, on CPU). The loss falls from ln(512) ~ 6.2 to about 2.5.
"""

from minimax_jax.config import tiny
from minimax_jax.data.pipeline import DataConfig
from minimax_jax.train.config import CheckpointConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=tiny(),
        data=DataConfig(tokenizer="byte"),
        optimizer=OptimizerConfig(learning_rate=4e-3, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.01),
        checkpoint=CheckpointConfig(every_steps=100, max_to_keep=2),
        seq_len=128,
        global_batch_size=8,
        num_steps=120,
        compute_dtype="float32",
        log_every_steps=10,
        peak_flops_per_device=1e11,  # a nominal CPU figure; MFU on CPU is only indicative
        sample_prompt="def ",
        sample_new_tokens=48,
    )
