"""Processes, the device mesh from config, and global batches assembled from per-host data.

One code path: a single CPU process is a 1-process, 1-device mesh; a TPU pod is N processes whose
mesh comes from `MeshConfig`. Each process loads only its rows of the global batch
(`process_rows`) and `global_batch` stitches them into one array sharded over the data axes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ponderttt.train.config import ConfigError, MeshConfig, PlatformConfig
from ponderttt.train.logs import LOG

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


def initialize(platform: PlatformConfig) -> None:
    """Joins the multi-process run the config describes (no-op for distributed=off). Call before any jax work."""
    if platform.distributed == "off":
        return
    if platform.cpu_collectives == "gloo":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if platform.distributed == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(platform.coordinator_address, num_processes=platform.num_processes,
                                   process_id=platform.process_id)


def make_mesh(mesh: MeshConfig, devices: Any = None) -> Any:
    """A `jax.sharding.Mesh` with axes (data, fsdp, tensor) shaped by `mesh` over all (or the given) devices."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Any) -> Any:
    """Sharding of a [batch, ...] array: rows split over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Any) -> Any:
    """Sharding of an array held in full by every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def on_mesh(tree: Any, mesh: Any) -> Any:
    """`tree` with every array that is not yet laid out on `mesh` (e.g. an optimizer's step count) replicated on it.

    A training step returns its state on the mesh; giving it an initial state laid out the same way keeps jit
    from compiling the step a second time on the second call (and lets a multi-process run pass it at all).
    """
    target = replicated(mesh)

    def place(leaf: Any) -> Any:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return leaf
        return jax.device_put(leaf, target)

    return jax.tree.map(place, tree)


def mesh_of(tree: Any) -> Any:
    """The mesh of the first array in `tree` laid out by a NamedSharding (None when there is none)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of the global batch that process `process_index` loads (contiguous, equal shares)."""
    if global_batch_size % process_count:
        raise ConfigError(f"--data.batch-size={global_batch_size} is not divisible by the {process_count} processes; "
                          "make the global batch a multiple of the process count")
    share = global_batch_size // process_count
    return slice(process_index * share, (process_index + 1) * share)


def global_batch(local_rows: Any, mesh: Any, global_batch_size: int) -> Any:
    """One global jax array [global_batch_size, ...] from this process's rows (numpy), sharded by `batch_sharding`."""
    shape = (global_batch_size, *local_rows.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows, shape)


def to_host(tree: Any) -> Any:
    """`tree` as numpy arrays on this host, in full: `jax.device_get`, except that an array spread over several
    processes (e.g. per-sequence results of a batch split over hosts) is gathered from all of them first.

    A collective when the run has several processes: every process must call it, in the same order."""
    def fetch(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(jax.device_get(leaf))

    return jax.tree.map(fetch, tree)


def shows_progress(run: Any) -> bool:
    """Whether this process draws progress bars: `--progress` is on and it is process 0 (one set of bars per run)."""
    return bool(run.progress) and jax.process_index() == 0


def say(message: str) -> None:
    """Logs `message` once per run, on process 0: with a timestamp, to stdout and the run's run.log (`logs`)."""
    if jax.process_index() == 0:
        LOG.info(message)
