"""Device mesh from a config: named axes with sizes, and the shardings a data-parallel trainer needs.

A ``MeshConfig`` names every mesh axis the run uses (``("data",)`` today; expert or sequence axes later) and its
size; sizes of 1 are allowed, so configs can name axes that are not split yet, and one size may be -1 ("all the
remaining devices"). ``batch_axes`` are the axes the batch dimension is split over.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axes: ``axis_names[i]`` has ``axis_sizes[i]`` devices (-1 once: whatever is left)."""

    axis_names: tuple[str, ...] = ("data",)
    axis_sizes: tuple[int, ...] = (-1,)
    batch_axes: tuple[str, ...] = ("data",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis_names", tuple(self.axis_names))
        object.__setattr__(self, "axis_sizes", tuple(int(s) for s in self.axis_sizes))
        object.__setattr__(self, "batch_axes", tuple(self.batch_axes))
        if len(self.axis_names) != len(self.axis_sizes):
            raise ValueError(f"mesh.axis_names {self.axis_names} and mesh.axis_sizes {self.axis_sizes} "
                             "differ in length")
        if len(set(self.axis_names)) != len(self.axis_names):
            raise ValueError(f"mesh.axis_names has duplicates: {self.axis_names}")
        if any(s == 0 or s < -1 for s in self.axis_sizes) or self.axis_sizes.count(-1) > 1:
            raise ValueError(f"mesh.axis_sizes must be positive, with at most one -1: {self.axis_sizes}")
        unknown = [a for a in self.batch_axes if a not in self.axis_names]
        if unknown:
            raise ValueError(f"mesh.batch_axes {unknown} are not in mesh.axis_names {self.axis_names}")

    def resolved_sizes(self, num_devices: int) -> tuple[int, ...]:
        """The axis sizes with -1 replaced so that their product is ``num_devices``."""
        known = math.prod(s for s in self.axis_sizes if s != -1)
        if -1 in self.axis_sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into mesh axes {self.axis_sizes}")
            return tuple(num_devices // known if s == -1 else s for s in self.axis_sizes)
        if known != num_devices:
            raise ValueError(f"mesh.axis_sizes {self.axis_sizes} need {known} devices, have {num_devices}")
        return self.axis_sizes


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with the config's axes (Auto axis types)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolved_sizes(len(devices))
    return jax.make_mesh(sizes, config.axis_names, axis_types=(AxisType.Auto,) * len(sizes), devices=devices)


def batch_sharding(mesh: Mesh, config: MeshConfig) -> NamedSharding:
    """Leading (batch) dimension split over ``config.batch_axes``; the other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(config.batch_axes or None))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params and optimizer state under pure data parallelism)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_parallelism(mesh: Mesh, config: MeshConfig) -> int:
    """How many ways the batch is split (the global batch must be a multiple of it)."""
    return math.prod(mesh.shape[a] for a in config.batch_axes)
