"""Data parallelism with JAX's own machinery: a device mesh, NamedSharding, jax.distributed.

The batch is split over the mesh's "data" axis; parameters and optimizer state
are replicated. The same jitted train step runs on 1 device or many: XLA
inserts the gradient all-reduce because the inputs say how they are laid out.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grassjax.train.config import ConfigError

DATA_AXIS = "data"


class ParallelConfigError(ConfigError):
    """Batch sizes that cannot be split over the devices; the message names the keys to change."""


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None):
    """jax.distributed.initialize for multi-host runs; a no-op when no coordinator is given."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all visible devices (of every process), axis "data"."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's batch is divided.

    global_batch = per_device_batch * num_devices * grad_accum_steps
    Each process feeds local_batch = global_batch / num_processes rows.
    """

    global_batch: int
    per_device_batch: int
    num_devices: int
    grad_accum_steps: int
    num_processes: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.num_processes

    @property
    def microbatch(self) -> int:
        """Rows per accumulation step, over all devices."""
        return self.global_batch // self.grad_accum_steps


def batch_layout(train_cfg, num_devices: int | None = None, num_processes: int | None = None) -> BatchLayout:
    """From train.batch_size (global) or train.per_device_batch_size (> 0 wins), and train.grad_accum_steps."""
    num_devices = num_devices or jax.device_count()
    num_processes = num_processes or jax.process_count()
    accum = int(train_cfg.grad_accum_steps)
    if accum < 1:
        raise ParallelConfigError(f"--config.train.grad_accum_steps must be >= 1, got {accum}")
    if train_cfg.per_device_batch_size > 0:
        per_device = int(train_cfg.per_device_batch_size)
        global_batch = per_device * num_devices * accum
    else:
        global_batch = int(train_cfg.batch_size)
        if global_batch % (num_devices * accum):
            raise ParallelConfigError(
                f"--config.train.batch_size={global_batch} must be divisible by devices ({num_devices}) x "
                f"--config.train.grad_accum_steps ({accum}); or set --config.train.per_device_batch_size")
        per_device = global_batch // (num_devices * accum)
    return BatchLayout(global_batch, per_device, num_devices, accum, num_processes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the data axis, the rest of each array whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """Place every leaf of a pytree (params, optimizer state) on all devices."""
    return jax.device_put(tree, replicated(mesh))


def shard_global_batch(global_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global (B, ...) batch as one jax.Array split over the mesh; each process contributes its slice.

    Every process computes the same global batch from (seed, step) and keeps only
    its own rows, so no data moves between hosts.
    """
    nproc, pid = jax.process_count(), jax.process_index()
    local = np.asarray(global_rows).reshape(nproc, -1, *global_rows.shape[1:])[pid]
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local, global_rows.shape)


def replicate_host_array(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds identically, replicated on all devices (works multi-host)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])
