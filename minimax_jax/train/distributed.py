"""Joining a multi-process JAX job: ``jax.distributed.initialize`` from explicit values or the environment."""

from __future__ import annotations

import os

import jax


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto_detect: bool = False) -> bool:
    """Initializes ``jax.distributed`` when a multi-process job is described; returns whether it did.

    Each value falls back to the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``). With no coordinator address the run is single-process, unless ``auto_detect``, which lets
    JAX read the cluster (SLURM, Open MPI, Cloud TPU...) itself. Must run before anything touches the devices.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is None:
        if auto_detect:
            jax.distributed.initialize()
            return True
        return False
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    return True


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"a coordinator address is set but {name} is not (pass it as a flag or set it)")
    return int(value)
