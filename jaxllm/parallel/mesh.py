"""Device meshes with the named axes ("data", "model") that the sharding rules refer to."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.parallel.rules import DATA_AXIS, MODEL_AXIS

MESH_AXES = (DATA_AXIS, MODEL_AXIS)


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A [data_parallel_size, tensor_parallel_size] mesh over `devices` (default: all devices).

    The product must equal the device count exactly: silently idling devices would hide a
    misconfiguration. A `model` group is a run of consecutive devices (jax.devices() order
    puts a host's, and on GPUs an NVLink island's, devices next to each other), so the
    tensor-parallel collectives stay on the fastest links.
    """
    for name, value in (("tensor_parallel_size", tensor_parallel_size),
                        ("data_parallel_size", data_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    devices = list(jax.devices() if devices is None else devices)
    want = tensor_parallel_size * data_parallel_size
    if len(devices) != want:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size="
            f"{data_parallel_size} needs {want} devices, but {len(devices)} are available "
            f"({_describe(devices)}); pass matching sizes or choose the devices explicitly")
    grid = np.array(devices, dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, MESH_AXES)


def data_slice_meshes(mesh: Mesh) -> list[Mesh]:
    """One [1, tp] mesh per `data` index: each data-parallel engine's own devices.

    The sub-meshes keep both axis names, so the same rules place parameters on each.
    """
    _check_axes(mesh)
    grid = mesh.devices
    return [Mesh(grid[i:i + 1], MESH_AXES) for i in range(grid.shape[0])]


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """The 1x1 mesh: the same rules and code path on one device."""
    return make_mesh(1, 1, [device or jax.devices()[0]])


def _check_axes(mesh: Mesh) -> None:
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"expected a mesh with axes {MESH_AXES}, got {mesh.axis_names}")


def _describe(devices: Sequence[jax.Device]) -> str:
    kinds = sorted({d.platform for d in devices})
    return ", ".join(kinds) if kinds else "none"
