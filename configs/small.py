"""The ~1B "small" preset for one H100 80GB at 8K context: bf16 compute, fp32 master weights and AdamW state.

Memory (fp32 params + grads + 2 Adam moments = 16 bytes/param, ~1.1B params ~ 18 GB) leaves room for activations
of one 8K-token micro-batch (4 accumulated per step) with full remat of each layer group and a chunked
cross-entropy (65K vocab: the whole-batch fp32 logits would be 8.6 GB). Needs a ``tokenizer.json`` of at most
65,536 tokens and text data:
``--config.data.tokenizer=/path/tokenizer.json --config.data.sources=/data/*.jsonl``.
"""

from minimax_jax.config import small
from minimax_jax.data.pipeline import DataConfig
from minimax_jax.train.config import CheckpointConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=small(),
        data=DataConfig(tokenizer="byte", read_threads=8, prefetch_batches=4),
        optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=500, end_lr_ratio=0.1, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=1000, max_to_keep=3),
        seq_len=8192,
        global_batch_size=4,
        grad_accum_steps=4,  # micro-batches of 1 x 8K: 4 x 8K at once ran out of memory on an H100
        num_steps=20_000,
        compute_dtype="bfloat16",
        remat_policy="full",
        loss_chunk_size=1024,
        log_every_steps=10,
        peak_flops_per_device=989e12,  # H100 SXM dense bf16
        sample_new_tokens=64,
    )
