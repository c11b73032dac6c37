"""The conversion plan: every stacked parameter, the official tensors that fill it, and its target sharding.

Built from the config alone (``nnx.eval_shape``: nothing allocated, no tensor read), so ``--dry_run`` can print it
for the full 456B model. The name <-> slice mapping is ``checkpoint.official_tensor_mappings``; this module only
groups it by parameter and adds where each parameter goes on a mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from minimax_jax.checkpoint import ParamPath, TensorMapping, official_tensor_mappings
from minimax_jax.config import ModelConfig
from minimax_jax.model.transformer import MiniMaxForCausalLM
from minimax_jax.parallel.sharding import check_divisible, logical_to_spec


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """One stacked parameter: shape and dtype, its sharding on the target mesh, and the tensors that fill it.

    ``chunk_shape`` is the storage chunk: one official tensor's slice, further split so that no chunk straddles
    two target shards (each device then reads only its own chunks on restore).
    """

    path: ParamPath
    shape: tuple[int, ...]
    dtype: np.dtype
    logical_axes: tuple[str | None, ...]
    spec: PartitionSpec
    chunk_shape: tuple[int, ...]
    mappings: tuple[TensorMapping, ...]

    @property
    def key(self) -> tuple[str, ...]:
        """The parameter's key path in the checkpoint (integer layer indices as strings, as the trainer writes)."""
        return tuple(str(p) for p in self.path)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def block_shape(self, mapping: TensorMapping) -> tuple[int, ...]:
        """The parameter-layout shape of one official tensor (the trailing dims after its index)."""
        return self.shape[len(mapping.index):]


def parse_mesh(text: str | None) -> AbstractMesh | None:
    """``"fsdp=8,expert=4"`` -> an abstract mesh with those axes (no devices needed); empty or None -> None."""
    if not text:
        return None
    names, sizes = [], []
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"mesh axis {part!r}: expected name=size with a positive size, e.g. 'fsdp=8'")
        names.append(name.strip())
        sizes.append(int(size))
    return AbstractMesh(tuple(sizes), tuple(names))


def _shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh: AbstractMesh | None) -> tuple[int, ...]:
    if mesh is None:
        return tuple(shape)
    out = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(size // math.prod(mesh.shape[a] for a in names))
    return tuple(out)


def conversion_plan(config: ModelConfig, dtype: np.dtype | str, mesh: AbstractMesh | None = None) -> list[ParamPlan]:
    """Every parameter of ``config``'s model in checkpoint order, with its official tensors and target sharding.

    Raises ``ShardingError`` naming the parameter if a dimension does not divide its mesh axes, and
    ``AssertionError`` if the official mapping does not cover exactly the model's parameters.
    """
    dtype = np.dtype(dtype)
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, dtype=dtype, param_dtype=dtype))
    variables = {path: var for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    by_path: dict[ParamPath, list[TensorMapping]] = {}
    for m in official_tensor_mappings(config):
        by_path.setdefault(m.param_path, []).append(m)
    if set(by_path) != set(variables):
        raise AssertionError("official_tensor_mappings does not cover exactly the model's parameters: "
                             f"{sorted(map(str, set(by_path) ^ set(variables)))}")
    plans = []
    for path, mappings in by_path.items():
        var = variables[path]
        shape = tuple(var.get_value().shape)
        logical = tuple(var.get_metadata().get("out_sharding") or (None,) * len(shape))
        name = ".".join(map(str, path))
        if mesh is None:
            spec = PartitionSpec()
        else:
            check_divisible(name, shape, logical, mesh)
            spec = logical_to_spec(logical, mesh)
        index_dims = len(mappings[0].index)
        block = (1,) * index_dims + shape[index_dims:]
        chunk = tuple(math.gcd(b, s) for b, s in zip(block, _shard_shape(shape, spec, mesh), strict=True))
        plans.append(ParamPlan(path, shape, dtype, logical, spec, chunk, tuple(mappings)))
    return plans


def format_plan(plans: Sequence[ParamPlan], mesh: AbstractMesh | None) -> str:
    """The full mapping (every official tensor -> parameter slice) and every parameter's target sharding."""
    mesh_text = "single device" if mesh is None else ", ".join(f"{a}={s}" for a, s in mesh.shape.items())
    lines = [f"# target mesh: {mesh_text}", "# parameters: key  shape  dtype  logical axes  -> spec  chunk"]
    for p in plans:
        lines.append(f"{'.'.join(p.key)}  {list(p.shape)}  {p.dtype.name}  {p.logical_axes}  -> {p.spec}  "
                     f"chunk {list(p.chunk_shape)}")
    lines.append("# official tensors: name  official shape  -> parameter[index]  (T: transposed)")
    for p in plans:
        for m in p.mappings:
            index = "".join(f"[{i}]" for i in m.index)
            lines.append(f"{m.name}  {list(m.official_shape)}  -> {'.'.join(p.key)}{index}"
                         f"{'  T' if m.transpose else ''}")
    tensors = sum(len(p.mappings) for p in plans)
    lines.append(f"# {len(plans)} parameters, {tensors} official tensors, "
                 f"{sum(p.nbytes for p in plans) / 1e9:.3f} GB in {plans[0].dtype.name if plans else '-'}")
    return "\n".join(lines)


def abstract_params(plans: Sequence[ParamPlan], sharding_of=None) -> dict:
    """The checkpoint's params tree of ``jax.ShapeDtypeStruct`` (string keys), for restoring.

    ``sharding_of(plan) -> jax.sharding.Sharding`` sets each leaf's sharding (default: the first device).
    """
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree: dict = {}
    for p in plans:
        node = tree
        for key in p.key[:-1]:
            node = node.setdefault(key, {})
        node[p.key[-1]] = jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=default if sharding_of is None
                                               else sharding_of(p))
    return tree
