"""Bad sources give errors that name the file or tensor, and a failed conversion leaves nothing that looks done."""

import glob
import os
import shutil

import orbax.checkpoint as ocp
import pytest

import minimax_jax.convert.hf_to_orbax as hf_to_orbax
from minimax_jax.checkpoint import CheckpointError
from minimax_jax.config import ModelConfig
from minimax_jax.convert import convert_hf_to_orbax, convert_orbax_to_hf, params_dir
from minimax_jax.convert.layout import latest_step
from minimax_jax.convert.safetensors_format import (
    SafetensorsError,
    TensorSpec,
    read_folder_index,
    read_tensor,
    write_file,
)

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "golden", "official_partial_rope")


def _copy(tmp_path) -> str:
    src = str(tmp_path / "src")
    shutil.copytree(OFFICIAL, src)
    return src


def _assert_nothing_complete(out: str) -> None:
    assert latest_step(out) is None
    assert not os.path.exists(os.path.join(out, "0"))
    assert not glob.glob(os.path.join(out, "*orbax-checkpoint-tmp*"))
    assert not os.path.exists(os.path.join(out, "config.json"))
    if os.path.exists(out):
        assert ocp.CheckpointManager(out).latest_step() is None


def test_truncated_file_names_the_file_and_tensor(tmp_path):
    src = _copy(tmp_path)
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: truncated: tensor '.+' ends at byte"):
        convert_hf_to_orbax(src, str(tmp_path / "out"), progress_stream=None)
    _assert_nothing_complete(str(tmp_path / "out"))


def test_corrupt_header_is_reported(tmp_path):
    src = _copy(tmp_path)
    with open(os.path.join(src, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage\xff")
    with pytest.raises(SafetensorsError, match="corrupt header"):
        convert_hf_to_orbax(src, str(tmp_path / "out"), progress_stream=None)


def test_missing_tensor_is_named(tmp_path):
    src = _copy(tmp_path)
    entries = read_folder_index(OFFICIAL)
    dropped = "model.layers.5.block_sparse_moe.experts.2.w3.weight"
    kept = [TensorSpec(e.name, e.dtype, e.shape) for e in entries.values() if e.name != dropped]
    write_file(os.path.join(src, "model.safetensors"), kept, lambda s: read_tensor(entries[s.name]))
    with pytest.raises(CheckpointError, match=rf"1 missing tensor\(s\):\n  {dropped.replace('.', r'\.')}"):
        convert_hf_to_orbax(src, str(tmp_path / "out"), progress_stream=None)
    _assert_nothing_complete(str(tmp_path / "out"))


def test_failure_while_writing_leaves_no_step(tmp_path, monkeypatch):
    """A read error in the middle of the write (e.g. a disk error) aborts orbax before its final rename."""
    calls = {"n": 0}

    def failing_read(entry):
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError("simulated I/O error")
        return read_tensor(entry)

    monkeypatch.setattr(hf_to_orbax, "read_tensor", failing_read)
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match="simulated I/O error"):
        convert_hf_to_orbax(OFFICIAL, out, progress_stream=None)
    assert calls["n"] == 60
    _assert_nothing_complete(out)


def test_failed_export_leaves_no_output(tmp_path, monkeypatch):
    orbax_dir = str(tmp_path / "orbax")
    convert_hf_to_orbax(OFFICIAL, orbax_dir, progress_stream=None)
    import minimax_jax.convert.orbax_to_hf as orbax_to_hf

    original = orbax_to_hf.param_to_official
    calls = {"n": 0}

    def failing(mapping, block):
        calls["n"] += 1
        if calls["n"] == 100:
            raise OSError("simulated disk full")
        return original(mapping, block)

    monkeypatch.setattr(orbax_to_hf, "param_to_official", failing)
    out = str(tmp_path / "hf")
    with pytest.raises(OSError, match="simulated disk full"):
        convert_orbax_to_hf(params_dir(orbax_dir), out, ModelConfig.from_json(orbax_dir), max_shard_bytes=200_000,
                            progress_stream=None)
    assert not os.path.exists(out)
    assert not glob.glob(out + "*")


def test_wrong_config_is_reported_before_writing(tmp_path):
    orbax_dir = str(tmp_path / "orbax")
    convert_hf_to_orbax(OFFICIAL, orbax_dir, progress_stream=None)
    wrong = ModelConfig.from_json(OFFICIAL).replace(intermediate_size=16)
    with pytest.raises(CheckpointError, match=r"mis-shaped: groups\.layers\.0\.moe\.w1"):
        convert_orbax_to_hf(params_dir(orbax_dir), str(tmp_path / "hf"), wrong, progress_stream=None)
    with pytest.raises(FileExistsError, match="exists"):
        convert_hf_to_orbax(OFFICIAL, orbax_dir, progress_stream=None)
