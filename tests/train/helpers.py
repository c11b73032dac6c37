"""Small configs for the training tests: a 2-layer (lightning + softmax) model, short sequences, fp32."""

from __future__ import annotations

from minimax_jax.config import tiny
from minimax_jax.data.pipeline import DataConfig
from minimax_jax.train.config import CheckpointConfig, OptimizerConfig, TrainConfig


def micro_model(**changes):
    """Two layers (one lightning, one softmax), hidden 32, 4 experts: compiles in seconds on CPU."""
    fields = dict(num_hidden_layers=2, attn_type_list=(0, 1), hidden_size=32, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, intermediate_size=16)
    fields.update(changes)
    return tiny().replace(**fields)


def micro_train_config(**changes) -> TrainConfig:
    """A TrainConfig for a few CPU steps on the built-in corpus (no prefetch threads, fp32)."""
    fields = dict(
        model=micro_model(),
        data=DataConfig(tokenizer="byte", read_threads=0, prefetch_batches=0),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
        checkpoint=CheckpointConfig(every_steps=2, max_to_keep=5, async_save=True),
        seq_len=32, global_batch_size=4, num_steps=6, compute_dtype="float32", log_every_steps=1,
        sample_new_tokens=0,
    )
    fields.update(changes)
    return TrainConfig(**fields)
