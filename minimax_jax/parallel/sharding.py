"""Logical axis rules: the one table that maps the model's logical axis names to mesh axes, and its checks.

Every weight is created with logical axis names (``out_sharding`` metadata, see ``model/params_init.py``). This
module turns those names into ``PartitionSpec``s and ``NamedSharding``s for a mesh, refuses shapes that do not divide
their mesh axes (the error names the parameter, the dimension and the axis), and creates a model whose parameters
are born sharded. Mesh axes that a rule names but the mesh lacks are treated as size 1, so one table serves every
mesh from ``parallel/mesh.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# The mesh axes the rules speak of (any may be absent from a mesh or have size 1).
DATA, FSDP, EXPERT, SEQUENCE, TENSOR = "data", "fsdp", "expert", "sequence", "tensor"

LOGICAL_AXIS_RULES: Mapping[str, MeshAxes] = {
    # activations
    "batch": (DATA, FSDP, EXPERT),
    "seq": SEQUENCE,
    # weights
    "layers": None,
    "vocab": TENSOR,
    "embed": FSDP,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "head_dim": None,
    "qkv_dim": None,
    "mlp": TENSOR,
    "expert": EXPERT,
}

# Which config field sets each logical dimension, so that a divisibility error points at the config.
_CONFIG_FIELD = {
    "vocab": "vocab_size", "embed": "hidden_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "mlp": "intermediate_size", "expert": "num_local_experts", "layers": "num_layer_groups",
}


class ShardingError(ValueError):
    """A shape does not divide the mesh axes its logical axis maps to, or a rule is malformed."""


def mesh_axes_for(logical: str | None, mesh: Mesh | jax.sharding.AbstractMesh,
                  rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """The mesh axes that logical axis ``logical`` is split over; ``()`` if replicated.

    Axes missing from ``mesh`` or of size 1 are left out: they split nothing, and leaving them out keeps specs free
    of spurious conflicts (e.g. a size-1 fsdp axis on both the batch and the embedding dimension).
    """
    if logical is None:
        return ()
    if logical not in rules:
        raise ShardingError(f"logical axis {logical!r} has no entry in the axis rules (known: {sorted(rules)})")
    target = rules[logical]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """``PartitionSpec`` for an array whose dimensions have the given logical names (a mesh axis used once)."""
    entries, used = [], set()
    for logical in logical_axes:
        axes = mesh_axes_for(logical, mesh, rules)
        reused = used.intersection(axes)
        if reused:
            raise ShardingError(f"logical axes {tuple(logical_axes)} map mesh axis {sorted(reused)[0]!r} twice")
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def check_divisible(name: str, shape: Sequence[int], logical_axes: Sequence[str | None],
                    mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> None:
    """Raise ``ShardingError`` naming the dimension and the mesh axis if a dimension does not divide its axes."""
    if len(shape) != len(logical_axes):
        raise ShardingError(f"{name}: shape {tuple(shape)} has {len(shape)} dimensions but logical axes "
                            f"{tuple(logical_axes)} name {len(logical_axes)}")
    for dim, (size, logical) in enumerate(zip(shape, logical_axes, strict=True)):
        axes = mesh_axes_for(logical, mesh, rules)
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            field = f" (config field {_CONFIG_FIELD[logical]})" if logical in _CONFIG_FIELD else ""
            sizes = " x ".join(f"{a!r}={mesh.shape[a]}" for a in axes)
            raise ShardingError(f"{name}: dimension {dim} {logical!r} of size {size}{field} is not divisible by "
                                f"mesh axis {sizes} ({ways} ways)")


def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("out_sharding")
    return tuple(axes) if axes else (None,) * len(variable.get_value().shape)


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_shardings(state: nnx.State, mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> nnx.State:
    """``NamedSharding`` of every variable in ``state`` (abstract or concrete), after checking divisibility."""
    def sharding_of(path, variable):
        logical = _logical_axes(variable)
        check_divisible(_path_name(path), variable.get_value().shape, logical, mesh, rules)
        return variable.replace(NamedSharding(mesh, logical_to_spec(logical, mesh, rules)))

    return nnx.map_state(sharding_of, state)


def create_sharded[M: nnx.Module](make_model: Callable[[], M], mesh: Mesh,
                   rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> M:
    """Build ``make_model()`` with every parameter created directly in its sharding (no host copy of the model).

    The model is first traced abstractly (``nnx.eval_shape``) to read its logical axes and check them against the
    mesh, then initialized under ``jax.jit`` with those shardings as ``out_shardings``.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))  # no mesh set: names stay logical
    shardings = param_shardings(abstract_state, mesh, rules)
    init = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)
    return nnx.merge(graphdef, init())


def abstract_sharded[M: nnx.Module](make_model: Callable[[], M], mesh: Mesh | jax.sharding.AbstractMesh,
                                    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES
                                    ) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and a state of ``ShapeDtypeStruct``s carrying their shardings; nothing is allocated.

    ``mesh`` may be an ``AbstractMesh``, to plan a 456B run on a machine that does not have its devices.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = param_shardings(abstract_state, mesh, rules)
    shaped = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    return graphdef, shaped


def shard_model[M: nnx.Module](model: M, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> M:
    """Place an existing model's variables on ``mesh`` by the rules (e.g. a checkpoint loaded on one host)."""
    graphdef, state = nnx.split(model)
    placed = jax.device_put(state, param_shardings(state, mesh, rules))
    return nnx.merge(graphdef, placed)


def activation_spec(logical_axes: Sequence[str | None], mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """``PartitionSpec`` of an activation, e.g. ``("batch", "seq", None)`` for token inputs."""
    return logical_to_spec(logical_axes, mesh, rules)


def shard_batch(array: jax.Array, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> jax.Array:
    """Put a ``[batch, seq, ...]`` input on the mesh: batch over the batch axes, seq over the sequence axis."""
    logical = ("batch", "seq") + (None,) * (array.ndim - 2)
    check_divisible("input", array.shape, logical, mesh, rules)
    return jax.device_put(array, NamedSharding(mesh, logical_to_spec(logical, mesh, rules)))


__all__ = ["LOGICAL_AXIS_RULES", "ShardingError", "abstract_sharded", "activation_spec", "check_divisible",
           "create_sharded", "logical_to_spec", "mesh_axes_for", "param_shardings", "shard_batch", "shard_model"]
