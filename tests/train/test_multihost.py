"""2 processes x 4 CPU devices train to the same losses as 1 process x 8 devices (same global batches)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "train" / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, local_devices: int, workdir: Path) -> list[dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(num_processes), str(i), str(local_devices),
                               str(port), str(workdir)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(num_processes)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_match_one(tmp_path):
    (single,) = _launch(1, 8, tmp_path / "single")
    pair = _launch(2, 4, tmp_path / "pair")
    assert sorted(single) == ["1", "2", "3"]
    assert pair[0] == pair[1]  # every process logs the same (global) loss
    np.testing.assert_allclose([pair[0][k] for k in "123"], [single[k] for k in "123"], rtol=1e-6)
