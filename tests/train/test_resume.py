"""Resuming a killed run reproduces the uninterrupted losses bitwise, also after a kill during a save."""

import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from minimax_jax.train.checkpointing import Checkpointer, CheckpointMismatchError, check_params_match
from minimax_jax.train.trainer import train
from tests.train.helpers import micro_train_config

CONFIG = micro_train_config(num_steps=6)  # checkpoints every 2 steps, async saves


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every train() call here compiles the same programs: a persistent cache compiles them once."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    result = train(CONFIG, tmp_path_factory.mktemp("uninterrupted"), echo=False)
    assert sorted(result.losses) == [1, 2, 3, 4, 5, 6]
    return result.losses


def test_resume_is_bitwise_exact(tmp_path, uninterrupted):
    killed = train(CONFIG, tmp_path, stop_after_steps=5, echo=False)  # "killed" after step 5: checkpoints 2, 4
    assert killed.final_step == 5
    resumed = train(CONFIG, tmp_path, echo=False)
    assert resumed.start_step == 4
    assert resumed.losses == {5: uninterrupted[5], 6: uninterrupted[6]}  # exact float equality
    assert {**killed.losses, **resumed.losses} == uninterrupted


def test_killed_during_save_resumes_from_last_complete_checkpoint(tmp_path, uninterrupted):
    train(CONFIG, tmp_path, stop_after_steps=3, echo=False)  # checkpoint 2 complete
    checkpoints = tmp_path / "checkpoints"
    # A save of step 4 that never finished: orbax writes into "<step>.orbax-checkpoint-tmp*" and renames the folder
    # to "<step>" only once every item is written, so a kill mid-save leaves exactly this (here half of it).
    partial = checkpoints / "4.orbax-checkpoint-tmp"
    shutil.copytree(checkpoints / "2", partial)
    shutil.rmtree(partial / "opt_state")
    assert Checkpointer(checkpoints, CONFIG.checkpoint).latest_step() == 2
    resumed = train(CONFIG, tmp_path, echo=False)
    assert resumed.start_step == 2
    assert resumed.losses == {s: uninterrupted[s] for s in (3, 4, 5, 6)}
    assert not partial.exists()  # the leftover is cleaned up
    assert (checkpoints / "6").is_dir()


def test_checkpoint_of_another_parameter_layout_is_refused_naming_the_parameters(tmp_path):
    """A checkpoint holding ``moe.w1``/``moe.w3`` (the layout before ``w13``) against a model with ``moe.w13``: the
    error names both sides, and the checkpoint stays on disk."""
    params = {"embed": jnp.ones(3), "moe": {"w1": jnp.ones(2), "w3": jnp.ones(2)}}
    checkpointer = ocp.StandardCheckpointer()  # the instance that saved is the one to wait on (an async save)
    checkpointer.save(tmp_path / "params", params)
    checkpointer.wait_until_finished()
    like = {"embed": jnp.ones(3), "moe": {"w13": jnp.ones((2, 2))}}
    with pytest.raises(CheckpointMismatchError, match=r"1 missing \(moe\.w13\), 2 unexpected \(moe\.w1, moe\.w3\)"):
        check_params_match(tmp_path / "params", like)
    check_params_match(tmp_path / "params", params)  # the same names pass
    assert (tmp_path / "params").is_dir()


def test_a_finished_run_is_not_compiled_or_trained_again(tmp_path, capsys):
    config = micro_train_config(num_steps=2, sample_new_tokens=3)
    first = train(config, tmp_path)
    capsys.readouterr()
    again = train(config, tmp_path)
    out = capsys.readouterr().out
    assert (again.start_step, again.final_step, again.losses) == (2, 2, {})
    assert "nothing to train" in out and "compiled the train step" not in out
    assert again.sample == first.sample  # the restored model samples what the trained one did
