"""Eight simulated CPU devices for the sharded tests.

``jax_num_cpu_devices`` must be set before any JAX backend starts and applies to the whole process, and other test
folders (the trainer's) build meshes over all devices. So it is set only when pytest runs nothing but
``tests/parallel``; in a mixed session these tests skip with a message saying to run them on their own.
"""

from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

_HERE = Path(__file__).parent.resolve()


def pytest_configure(config):
    """Runs when this conftest registers (during collection, before any test and so before any backend)."""
    paths = [Path(config.invocation_params.dir, arg.split("::")[0]).resolve() for arg in config.args]
    if paths and all(p == _HERE or _HERE in p.parents for p in paths):
        try:
            jax.config.update("jax_num_cpu_devices", 8)
        except RuntimeError:  # a backend is already up; `mesh_of` then skips with its message
            pass


AXES = ("data", "fsdp", "expert", "sequence", "tensor")


def mesh_of(sizes: dict[str, int], axis_type: AxisType = AxisType.Explicit) -> jax.sharding.Mesh:
    """A mesh with all five named axes (unnamed ones of size 1) on the first prod(sizes) devices."""
    shape = tuple(sizes.get(a, 1) for a in AXES)
    needed = int(np.prod(shape))
    if jax.device_count() < needed:
        pytest.skip(f"needs {needed} devices, have {jax.device_count()}: run `pytest tests/parallel` on its own "
                    "(it then simulates 8 CPU devices)")
    return jax.make_mesh(shape, AXES, axis_types=(axis_type,) * len(AXES), devices=jax.devices()[:needed])


def assert_rel_close(got, want, rel: float = 1e-5, name: str = "") -> float:
    """``max|got - want| <= rel * max|want|``; returns the observed relative error."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.max(np.abs(want))) or 1.0
    err = float(np.max(np.abs(got - want))) / scale
    assert err <= rel, f"{name}: relative error {err:.3g} > {rel:.1g}"
    return err
