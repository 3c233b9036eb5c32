"""Named partition rules: logical axis names -> mesh axes, and placing a model by them.

Models annotate every parameter with logical axis names (jaxllm.models.params.LOGICAL_AXES);
this table alone decides where each lands on the ("data", "model") mesh. With the default
table, q/k/v/gate/up kernels are column-parallel (their output axis `q_heads`/`kv_heads`/`mlp`
is split), o/down kernels are row-parallel (the same names sit on their input axis), the
embedding and an untied LM head are vocab-parallel, and everything else is replicated. XLA's
SPMD partitioner inserts the collectives (one all-reduce after each row-parallel matmul).

A dimension that the mesh axis does not divide is replicated instead:
sharding must be even, and a replicated tensor is always correct. Head counts are made
divisible beforehand by jaxllm.parallel.head_padding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

DATA_AXIS = "data"
MODEL_AXIS = "model"

# The one default rules table. Logical names absent here are replicated.
DEFAULT_LOGICAL_RULES: Mapping[str, str | None] = MappingProxyType({
    "vocab": MODEL_AXIS,      # embedding rows / LM-head columns: vocab-parallel
    "q_heads": MODEL_AXIS,    # q_proj columns (column-parallel), o_proj rows (row-parallel)
    "kv_heads": MODEL_AXIS,   # k/v_proj columns; the KV cache's head axis
    "mlp": MODEL_AXIS,        # gate/up columns (column-parallel), down rows (row-parallel)
    # Mixture of experts: whole experts split across devices (expert parallel); when the
    # expert count does not divide (or "expert" maps to None), each expert's hidden width is
    # split instead (tensor parallel inside experts). An array uses a mesh axis once, so
    # "expert" takes `model` first. Outputs are reduced with one psum (models.moe_model).
    "expert": MODEL_AXIS,
    "expert_mlp": MODEL_AXIS,
    "router_experts": None,
    "embed": None,
    "head_dim": None,
    "layers": None,
    "pages": None,
    "page_slot": None,
})

# Logical axes of one layer's KV cache [num_pages, page_size, 2 * Hkv, head_dim]. K of head h
# sits at 2h and V at 2h+1, so splitting dim 2 into whole-head chunks keeps each K/V pair
# on one device.
KV_CACHE_LOGICAL_AXES: tuple[str, ...] = ("pages", "page_slot", "kv_heads", "head_dim")


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis name (or None: replicated along that dimension)."""

    axes: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_LOGICAL_RULES))

    def mesh_axis(self, logical: str | None) -> str | None:
        return None if logical is None else self.axes.get(logical)

    def partition_spec(self, logical_axes: tuple[str | None, ...],
                       shape: tuple[int, ...] | None = None,
                       mesh: Mesh | None = None) -> PartitionSpec:
        """The PartitionSpec for an array with these logical axes.

        With `shape` and `mesh`, a dimension the mesh axis does not divide evenly is left
        replicated (logged at debug level). A mesh axis is used at most once per array.
        """
        if shape is not None and len(shape) != len(logical_axes):
            raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
        used: set[str] = set()
        out: list[str | None] = []
        for i, name in enumerate(logical_axes):
            axis = self.mesh_axis(name)
            if axis is not None and mesh is not None and axis not in mesh.shape:
                raise ValueError(f"rules map {name!r} to mesh axis {axis!r}, which mesh "
                                 f"{dict(mesh.shape)} does not have")
            if axis is not None and shape is not None and mesh is not None:
                if shape[i] % mesh.shape[axis] != 0:
                    _log_uneven(name, shape[i], axis, mesh.shape[axis])
                    axis = None
            if axis in used:
                axis = None
            if axis is not None:
                used.add(axis)
            out.append(axis)
        return PartitionSpec(*out)

    def sharding(self, mesh: Mesh, logical_axes: tuple[str | None, ...],
                 shape: tuple[int, ...] | None = None) -> NamedSharding:
        return NamedSharding(mesh, self.partition_spec(logical_axes, shape, mesh))


DEFAULT_RULES = ShardingRules()

def _log_uneven(name: str | None, size: int, axis: str, parts: int) -> None:
    logger.debug("logical axis %r of size %d is not divisible by mesh axis %r (%d): "
                 "replicating it", name, size, axis, parts)


def _spec_names(spec: Any) -> tuple[str | None, ...]:
    """Logical names out of what nnx.get_partition_spec returns for one leaf."""
    return tuple(spec) if spec is not None else ()


def model_shardings(model: nnx.Module, mesh: Mesh,
                    rules: ShardingRules = DEFAULT_RULES) -> Any:
    """A pytree like nnx.state(model) holding each array's NamedSharding under the rules."""
    state = nnx.state(model)
    logical = nnx.get_partition_spec(state)

    def one(value: jax.Array, spec: Any) -> NamedSharding:
        names = _spec_names(spec)
        if not names:  # no metadata (buffers like rope frequencies): replicated
            names = (None,) * value.ndim
        return rules.sharding(mesh, names, tuple(value.shape))

    return jax.tree.map(one, state, logical)


def place_array(value: Any, sharding: NamedSharding) -> jax.Array:
    """Put `value` on the devices of `sharding`, copying only each device's slice.

    Works across processes too: when some devices are remote, each process builds its own
    shards from its (identical) host copy.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    import numpy as np

    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> nnx.Module:
    """Place every array of `model` on `mesh` by the rules (in place); returns the model."""
    state = nnx.state(model)
    shardings = model_shardings(model, mesh, rules)
    placed = jax.tree.map(place_array, state, shardings)
    nnx.update(model, placed)
    bind_mesh(model, mesh, rules)
    return model


def bind_mesh(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> None:
    """Tell the model's mesh-aware modules (those with a `bind_mesh(mesh, rules)` method, e.g.
    mixture-of-experts blocks, which run their experts under shard_map) where they were placed."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "bind_mesh"):
            module.bind_mesh(mesh, rules)


def kv_cache_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
                      cache_shape: tuple[int, ...] | None = None) -> NamedSharding:
    """Sharding of one layer's KV cache: heads (dim 2) across `model`, the rest replicated.

    Pass `cache_shape` to be told (ValueError) when the head axis does not split into whole
    K/V pairs; pad heads first with jaxllm.parallel.head_padding.pad_heads_for_tp.
    """
    spec = rules.partition_spec(KV_CACHE_LOGICAL_AXES)
    axis = spec[2]
    if cache_shape is not None and axis is not None:
        parts = mesh.shape[axis]
        if len(cache_shape) != 4 or cache_shape[2] % 2 or (cache_shape[2] // 2) % parts:
            raise ValueError(
                f"KV cache of shape {cache_shape} cannot be split by KV head over {parts} "
                f"devices of mesh axis {axis!r}: the KV-head count must be a multiple of {parts} "
                "(use pad_heads_for_tp)")
    return NamedSharding(mesh, spec)


def flat_param_shardings(shapes: Mapping[str, tuple[int, ...]], mesh: Mesh,
                         rules: ShardingRules = DEFAULT_RULES) -> dict[str, NamedSharding]:
    """{flat param name: NamedSharding}, for loaders that place each tensor as it is read.

    `shapes` is e.g. jaxllm.models.params.expected_param_shapes(config) of the padded config.
    """
    from jaxllm.models.params import logical_axes

    return {name: rules.sharding(mesh, logical_axes(name), tuple(shape))
            for name, shape in shapes.items()}
