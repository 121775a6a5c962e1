"""Logical axis names, one rule table onto the mesh axes (data, fsdp, tensor), sharded init and placement.

Every parameter carries `logical_axes` metadata (a name per dimension); every large activation is constrained
with names from the same vocabulary. `LOGICAL_RULES` is the single table that maps names to mesh axes: change
the table, not the model, to change the layout.

Parameter names: vocab, embed, heads (query heads * head_dim), kv (kv heads * head_dim), mlp, pos, norm.
Activation names: batch, seq, act_embed, act_heads, act_kv, act_mlp, act_vocab (`act_*` are distinct from the
parameter names because FSDP shards parameters over `fsdp` while activations use it for the batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

LOGICAL_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("pos", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes over `devices` (default: all); one size may be -1 to take the
    remaining devices. Raises ValueError when the sizes do not multiply to the device count."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by the fixed axes product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices are given; "
            "make the product equal the device count or pass one axis as -1"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh_shape: dict[str, int] | None = None,
    rules: Rules = LOGICAL_RULES,
) -> PartitionSpec:
    """PartitionSpec for logical `axes` under `rules`.

    With `shape` and `mesh_shape`, a dimension whose size is not divisible by its mesh axes is left
    unsharded (tiny test models have odd sizes); mesh axes missing from `mesh_shape` are dropped.
    A mesh axis is never used twice in one spec. Raises ValueError for a logical name without a rule.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; add it to the rule table (known: {sorted(table)})")
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        if mesh_shape is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh_shape and mesh_shape[a] > 1)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if shape is not None and mesh_shape is not None and mesh_axes:
            if shape[i] % math.prod(mesh_shape[a] for a in mesh_axes):
                mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def _mesh_shape(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def constrain(
    x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None = None, rules: Rules = LOGICAL_RULES
) -> jax.Array:
    """`with_sharding_constraint` of x by logical names, one per dimension of x (e.g. ("batch", "seq",
    "act_embed") for [B, T, C]); returns x unchanged without a mesh (argument or `jax.set_mesh` context)."""
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        if abstract.empty:
            return x
        return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, _mesh_shape(abstract), rules))
    spec = logical_to_spec(axes, x.shape, _mesh_shape(mesh), rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def variable_spec(var: nnx.Variable, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec of one variable from its `logical_axes` metadata (replicated when it has none)."""
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        return PartitionSpec()
    return logical_to_spec(axes, var.shape, _mesh_shape(mesh), rules)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """The State's tree with a NamedSharding in place of every variable (abstract or concrete): jit out_shardings."""
    return jax.tree.map(
        lambda v: NamedSharding(mesh, variable_spec(v, mesh, rules)) if isinstance(v, nnx.Variable) else v,
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )


def state_specs(state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> dict[str, PartitionSpec]:
    """{'path.to.param': PartitionSpec} of an nnx State: for tests and reports."""
    flat = {}
    for path, var in nnx.to_flat_state(state):
        flat[".".join(str(p) for p in path)] = variable_spec(var, mesh, rules)
    return flat


def init_sharded(build: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
    """Builds `build()` with every parameter created directly in its shard (no full copy on one device): shapes
    come from `nnx.eval_shape`, then the state is made by a jit with the rule table's out_shardings."""
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def make() -> nnx.State:
        return nnx.state(build())

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
    """Moves an existing model's variables onto their shardings in place and returns it."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    placed = jax.tree.map(
        lambda v, s: v.replace(jax.device_put(v.get_value(), s)) if isinstance(v, nnx.Variable) else v,
        state,
        shardings,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    nnx.update(model, placed)
    return model
