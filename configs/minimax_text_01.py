"""The full MiniMax-Text-01 (456B) on a large mesh: bf16 compute, fp32 master weights, remat, chunked loss.

Data parallelism alone cannot hold 456B parameters (7.3 TB of fp32 weights + Adam state): this config names the
mesh axes that the expert/sequence-parallel work in ``minimax_jax/parallel`` will shard over (sizes of 1 until
then; set them with ``--config.mesh.axis_sizes=...``). Fine-tuning from the released weights needs their tokenizer:
``--config.data.tokenizer=/path/to/MiniMax-Text-01``.
"""

from minimax_jax.config import minimax_text_01
from minimax_jax.data.pipeline import DataConfig
from minimax_jax.parallel.mesh import MeshConfig
from minimax_jax.train.config import CheckpointConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=minimax_text_01(),
        data=DataConfig(tokenizer="byte", read_threads=16, prefetch_batches=4),
        optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=2000, end_lr_ratio=0.1, weight_decay=0.1,
                                  grad_clip_norm=1.0),
        checkpoint=CheckpointConfig(every_steps=500, max_to_keep=3),
        mesh=MeshConfig(axis_names=("data", "expert", "sequence"), axis_sizes=(-1, 1, 1),
                        batch_axes=("data", "expert")),
        seq_len=8192,
        global_batch_size=1024,
        grad_accum_steps=8,
        num_steps=100_000,
        compute_dtype="bfloat16",
        remat_policy="full",
        loss_chunk_size=512,
        log_every_steps=10,
        peak_flops_per_device=989e12,
        sample_new_tokens=0,
    )
