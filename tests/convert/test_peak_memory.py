"""Converting a 1.8 GB synthetic checkpoint both ways keeps the converter's peak RSS a small fraction of it.

The converters run in subprocesses; ``os.wait4`` gives each one's own peak RSS. The bound is checked on the RSS
above a bare process that only imports the same libraries (JAX, orbax, tensorstore: about 300 MB by themselves).
Takes about a minute and a half on 2 busy CPU cores; set MINIMAX_SKIP_BIG_CONVERT=1 to skip it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from minimax_jax.convert.safetensors_format import read_folder_index, read_tensor
from tests.convert.synthetic import wide_config, write_synthetic

pytestmark = pytest.mark.skipif(os.environ.get("MINIMAX_SKIP_BIG_CONVERT") == "1", reason="big conversion skipped")


def _run(args: list[str]) -> tuple[int, str]:
    """Runs ``python args``; returns its own peak RSS in bytes (``wait4``'s ru_maxrss is KiB) and stdout."""
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stdout = process.stdout.read()
    process.stdout.close()
    assert os.waitstatus_to_exitcode(status) == 0, stdout[-3000:]
    return usage.ru_maxrss * 1024, stdout


def test_streaming_conversion_peak_rss(tmp_path):
    size = write_synthetic(str(tmp_path / "src"), wide_config())
    assert size > 1.8e9
    baseline, _ = _run(["-c", "import jax, orbax.checkpoint, tensorstore, minimax_jax.convert"])
    to_orbax, out = _run(["scripts/convert_hf_to_orbax.py", f"--source={tmp_path / 'src'}",
                          f"--output={tmp_path / 'orbax'}"])
    assert "converted 127 tensors" in out
    to_hf, out = _run(["scripts/convert_orbax_to_hf.py", f"--source={tmp_path / 'orbax'}",
                       f"--output={tmp_path / 'hf'}", "--max_shard_size_gb=0.5"])
    assert "converted 127 tensors" in out
    print(f"\ncheckpoint {size / 2**20:.0f} MiB; peak RSS: baseline {baseline / 2**20:.0f} MiB, hf->orbax "
          f"{to_orbax / 2**20:.0f} MiB, orbax->hf {to_hf / 2**20:.0f} MiB")
    for peak in (to_orbax, to_hf):
        # What the conversion adds over a process that only imports the same libraries: about 8x the largest tensor
        # (34 MB), not the model. (Total RSS is not bounded here: the import footprint alone varied from 289 to
        # 446 MiB between machines.)
        assert peak - baseline < 0.15 * size

    source, exported = read_folder_index(str(tmp_path / "src")), read_folder_index(str(tmp_path / "hf"))
    assert set(source) == set(exported)
    for name in source:  # the round trip is bit-exact at this size too
        assert np.array_equal(read_tensor(source[name]).view(np.uint16), read_tensor(exported[name]).view(np.uint16))
