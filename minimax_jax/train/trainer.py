"""The training loop: mesh, model + optimizer state, data, jitted step, metrics, checkpoints, a closing sample.

``train(config, workdir)`` resumes from the newest complete checkpoint in ``<workdir>/checkpoints`` when there is
one, so re-running a killed command continues it; the losses are then bitwise those of an uninterrupted run.
Re-running a finished command (its checkpoint already at ``num_steps``) only prints the sample.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.data.tokenizer import Tokenizer, load_tokenizer
from minimax_jax.infer import Generator
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.parallel.mesh import batch_parallelism, batch_sharding, make_mesh, replicated
from minimax_jax.train.checkpointing import Checkpointer
from minimax_jax.train.config import TrainConfig
from minimax_jax.train.data import ShardedBatches, global_batch
from minimax_jax.train.flops import mfu
from minimax_jax.train.metrics import MetricsWriter, expert_load_metrics, progress_line
from minimax_jax.train.optimizer import learning_rate_schedule, make_optimizer
from minimax_jax.train.profiling import StepProfiler
from minimax_jax.train.step import init_train_state, make_train_step

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What a call to ``train`` did: the loss of every step it ran (``losses[step]``, 1-based) and a sample."""

    start_step: int
    final_step: int
    losses: dict[int, float]
    sample: str | None


def train(config: TrainConfig, workdir: str | Path, *, stop_after_steps: int | None = None,
          echo: bool = True) -> TrainResult:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint); see the module docstring.

    ``stop_after_steps``: return after that many steps of this call without a final checkpoint, as if killed
    (tests of resuming). ``echo``: print progress (process 0 only).
    """
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    say = print if (echo and is_main) else (lambda *a, **k: None)
    mesh = make_mesh(config.mesh)
    _check_batch_layout(config, batch_parallelism(mesh, config.mesh))
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model.vocab_size is {config.model.vocab_size}")

    graphdef, state = _initial_state(config, mesh)
    data = ShardedBatches(config.data, tokenizer, seq_len=config.seq_len, global_batch_size=config.global_batch_size,
                          data_shards=config.data_shards or jax.process_count(), process_index=jax.process_index(),
                          process_count=jax.process_count())
    checkpointer = Checkpointer(workdir / "checkpoints", config.checkpoint)
    start_step = 0
    if config.checkpoint.resume and (latest := checkpointer.latest_step()) is not None:
        state = checkpointer.restore(latest, state, data)
        start_step = latest
        say(f"resumed from {checkpointer.directory}/{latest}")
    if start_step >= config.num_steps:  # a finished run: nothing to compile or train
        say(f"step {start_step} already reaches num_steps={config.num_steps}: nothing to train "
            "(raise --config.num_steps to go on)")
        checkpointer.close()
        sample = _final_sample(config, graphdef, state, tokenizer, start_step, checkpointer.directory, say, is_main)
        del data
        return TrainResult(start_step=start_step, final_step=start_step, losses={}, sample=sample)

    schedule = learning_rate_schedule(config.optimizer, config.num_steps)
    step_fn = make_train_step(graphdef, make_optimizer(config.optimizer, config.num_steps), schedule,
                              grad_accum_steps=config.grad_accum_steps, remat_policy=config.remat_policy,
                              loss_chunk_size=config.loss_chunk_size,
                              aux_loss_coef=config.model.router_aux_loss_coef,
                              skip_nonfinite=config.skip_nonfinite_updates, scan_layers=config.scan_layers)
    batch_shard = batch_sharding(mesh, config.mesh)
    jitted = jax.jit(step_fn, in_shardings=(replicated(mesh), batch_shard), out_shardings=replicated(mesh),
                     donate_argnums=0)
    say(f"model {_param_count(state['params']) / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
        f"{jax.process_count()} process(es) | batch {config.global_batch_size} x {config.seq_len} tokens | "
        f"steps {start_step} -> {config.num_steps} | workdir {workdir}")
    compile_start = time.perf_counter()
    compiled = jitted.lower(state, _abstract_batch(config, batch_shard)).compile()
    say(f"compiled the train step in {time.perf_counter() - compile_start:.1f}s{_memory_summary(compiled)}")

    writer = MetricsWriter(workdir, enabled=is_main)
    profiler = StepProfiler(workdir / "profile", config.profile_steps, enabled=is_main)
    profiler.save_hlo(compiled.as_text)
    losses: dict[int, float] = {}
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    skipped_total = 0
    step = start_step
    interval_start, interval_steps = time.perf_counter(), 0
    tokens_per_step = config.global_batch_size * config.seq_len
    try:
        while step < config.num_steps:
            batch = global_batch(next(data), batch_shard, config.global_batch_size)
            profiler.before_step(step - start_step)
            state, metrics = compiled(state, batch)
            step += 1
            profiler.after_step(step - start_step, metrics)
            interval_steps += 1
            pending.append((step, metrics))
            last = step == config.num_steps
            if step % config.log_every_steps == 0 or last:
                fetched = jax.device_get(pending)
                elapsed = time.perf_counter() - interval_start
                tokens_per_second = interval_steps * tokens_per_step / elapsed
                for logged_step, values in fetched:
                    losses[logged_step] = float(values["loss"])
                    if int(values["skipped"]):
                        skipped_total += 1
                        say(f"step {logged_step}: non-finite loss or gradient (loss {float(values['loss'])}, "
                            f"grad norm {float(values['grad_norm'])}): update skipped")
                scalars = _scalars(fetched, config, tokens_per_second, skipped_total)
                say(progress_line(step, config.num_steps, scalars))
                writer.write(step, scalars)
                pending.clear()
                interval_start, interval_steps = time.perf_counter(), 0
            if step % config.checkpoint.every_steps == 0 or last:
                checkpointer.save(state, data)
            if stop_after_steps is not None and step - start_step >= stop_after_steps:
                break
    finally:
        profiler.stop()
        checkpointer.close()
        writer.close()
    sample = _final_sample(config, graphdef, state, tokenizer, step, checkpointer.directory, say, is_main)
    del data
    return TrainResult(start_step=start_step, final_step=step, losses=losses, sample=sample)


def _final_sample(config: TrainConfig, graphdef: nnx.GraphDef, state: dict[str, Any], tokenizer: Tokenizer,
                  step: int, checkpoint_dir: Path, say: Callable[..., None], is_main: bool) -> str | None:
    """The greedy sample printed once the run has reached ``num_steps`` (process 0; None otherwise)."""
    if not (is_main and config.sample_new_tokens and step == config.num_steps):
        return None
    sample = sample_text(graphdef, state["params"], tokenizer, config.sample_prompt, config.sample_new_tokens)
    say(f"checkpoint: {checkpoint_dir}/{step}\nsample (greedy) of {config.sample_prompt!r}:\n"
        f"{config.sample_prompt}{sample}")
    return sample


def sample_text(graphdef: nnx.GraphDef, params: dict, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy cached continuation of ``prompt`` (exactly ``max_new_tokens`` tokens) by the model with ``params``,
    copied off the training mesh onto this process's default device."""
    model = nnx.merge(graphdef, jax.device_put(jax.device_get(params)))
    prompt_ids = [int(i) for i in tokenizer.encode(prompt)]
    generator = Generator(model, max_length=len(prompt_ids) + max_new_tokens)
    return tokenizer.decode(generator.generate([prompt_ids], max_new_tokens=max_new_tokens).row(0))


def _initial_state(config: TrainConfig, mesh) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """The model's graphdef and a fresh train state created directly in its (replicated) sharding."""
    compute, storage = jnp.dtype(config.compute_dtype), jnp.dtype(config.param_dtype)

    def make_model() -> MiniMaxForCausalLM:
        return MiniMaxForCausalLM(config.model, dtype=compute, param_dtype=storage, rngs=nnx.Rngs(config.seed))

    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract_model)
    if jax.tree.leaves(nnx.state(abstract_model, nnx.Not(nnx.Param))):
        raise ValueError("the model holds non-Param state; the train state only carries nnx.Param values")
    optimizer = make_optimizer(config.optimizer, config.num_steps)

    def init() -> dict[str, Any]:
        params = nnx.to_pure_dict(nnx.state(make_model(), nnx.Param))
        return init_train_state(params, optimizer, config.seed)

    return graphdef, jax.jit(init, out_shardings=replicated(mesh))()


def _abstract_batch(config: TrainConfig, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (config.global_batch_size, config.seq_len)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
              "loss_mask": jnp.float32}
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for key, dtype in dtypes.items()}


def _check_batch_layout(config: TrainConfig, parallelism: int) -> None:
    micro_rows = config.global_batch_size // config.grad_accum_steps
    if micro_rows % parallelism:
        raise ValueError(f"global_batch_size / grad_accum_steps = {micro_rows} rows must be a multiple of the "
                         f"{parallelism}-way batch split of the mesh")
    shards = config.data_shards or jax.process_count()
    if shards % jax.process_count():
        raise ValueError(f"data_shards ({shards}) must be a multiple of the process count ({jax.process_count()})")


def _scalars(fetched: list[tuple[int, dict[str, np.ndarray]]], config: TrainConfig, tokens_per_second: float,
             skipped_total: int) -> dict[str, Any]:
    """Loss and aux loss averaged over the logged interval; the other values of its last step."""
    values = fetched[-1][1]
    scalars = {name: float(np.mean([v[name] for _, v in fetched])) for name in ("loss", "aux_loss")}
    scalars.update({name: float(values[name]) for name in ("grad_norm", "learning_rate", "tokens")})
    scalars["tokens_per_second"] = tokens_per_second
    scalars["mfu"] = mfu(config.model, config.seq_len, tokens_per_second, jax.device_count(),
                         config.peak_flops_per_device)
    scalars["skipped_total"] = skipped_total
    scalars.update(expert_load_metrics(values["expert_counts"]))
    return scalars


def _memory_summary(compiled) -> str:
    """``; per device: 12.3 GiB state + 4.5 GiB temporaries`` from XLA's memory analysis (empty if unavailable)."""
    try:
        analysis = compiled.memory_analysis()
        state, temp = analysis.argument_size_in_bytes, analysis.temp_size_in_bytes
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return ""
    return f"; per device: {state / 2**30:.1f} GiB state + {temp / 2**30:.1f} GiB temporaries"


def _param_count(params: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
