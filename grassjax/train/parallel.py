"""Data parallelism with JAX's own machinery: a device mesh, NamedSharding, jax.distributed.

The batch is split over the mesh's "data" axis; parameters and optimizer state
are replicated. The same jitted train step runs on 1 device or many: XLA
inserts the gradient all-reduce because the inputs say how they are laid out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grassjax.train.config import ConfigError

DATA_AXIS = "data"


class ParallelConfigError(ConfigError):
    """Batch sizes that cannot be split over the devices; the message names the keys to change."""


@contextlib.contextmanager
def _quiet_stdout():
    """Send file descriptor 1 to /dev/null for a while (C++ code prints there, below Python's
    sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class DistributedError(ConfigError):
    """Bad multi-process flags, or processes that did not all join; the message is one line.

    stuck: jax.distributed is still blocked in C++; the process must end with os._exit.
    """

    def __init__(self, message: str, stuck: bool = False):
        super().__init__(message)
        self.stuck = stuck


DISTRIBUTED_TIMEOUT_S = 60  # how long jax.distributed waits for every process to join


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, timeout_s: int = DISTRIBUTED_TIMEOUT_S):
    """jax.distributed.initialize for multi-process runs; a no-op when no coordinator is given.

    On CPU the cross-process collectives use gloo (TCP). A process that does not join within
    timeout_s ends the wait with one line naming which processes were expected.
    """
    if not coordinator_address:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise DistributedError("--num_processes/--process_id need "
                                   "--coordinator_address=HOST:PORT of process 0")
        return
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT, "
                               f"e.g. 127.0.0.1:1234")
    if num_processes is None or num_processes < 1:
        raise DistributedError(f"--num_processes must be >= 1 with --coordinator_address, "
                               f"got {num_processes}")
    if process_id is None or not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id must be in [0, {num_processes - 1}] for "
                               f"--num_processes={num_processes}, got {process_id}")
    # CPU: cross-process all-reduce over TCP
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax's own timeout aborts the process from C++ with a stack trace; wait in a thread with ours
    # instead, leaving jax's as a backstop well after it.
    done, errors = threading.Event(), []

    def connect():
        try:
            jax.distributed.initialize(coordinator_address=coordinator_address,
                                       num_processes=num_processes, process_id=process_id,
                                       initialization_timeout=timeout_s + 60,
                                       heartbeat_timeout_seconds=max(10, timeout_s))
        except Exception as err:  # noqa: BLE001 - XlaRuntimeError and friends
            errors.append(err)
        finally:
            done.set()

    threading.Thread(target=connect, daemon=True).start()
    if not done.wait(timeout_s):
        if process_id == 0:
            missing = f"process(es) {list(range(1, num_processes))} (not all of them)"
        elif _reachable(host, int(port)):
            missing = "another process (process 0, the coordinator, is up)"
        else:
            missing = f"process 0 (nothing answers at {coordinator_address})"
        raise DistributedError(
            f"process {process_id}: waited {timeout_s}s for {missing} to join; start every process "
            f"with the same --coordinator_address and --num_processes={num_processes}, or raise "
            f"--distributed_timeout",
            stuck=True)
    if errors:
        raise DistributedError(f"process {process_id}: jax.distributed could not start "
                               f"({type(errors[0]).__name__}: "
                               f"{str(errors[0]).splitlines()[0][:200]})")
    # gloo prints "[Gloo] Rank i is connected..." from C++ on its first collective
    with _quiet_stdout():
        multihost_utils.process_allgather(np.zeros((), np.int32))


PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "heartbeat", "Gloo",
                     "coordination service", "UNAVAILABLE")


def peer_lost(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process of a multi-process run is
    gone."""
    if jax.process_count() == 1:
        return False
    seen = err
    while seen is not None:
        if any(marker in str(seen) for marker in PEER_LOST_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def lost_peer_exit(step: int, kept: str, err: BaseException) -> None:
    """One line naming the lost process and the kept checkpoint, then end this process at once: a
    normal exit would wait in jax.distributed's shutdown barrier for the dead peer, then abort."""
    others = [i for i in range(jax.process_count()) if i != jax.process_index()]
    who = f"process {others[0]}" if len(others) == 1 else f"one of processes {others}"
    reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    print(f"launch.py: error: process {jax.process_index()} lost contact with {who} at step {step} "
          f"({reason}); {kept}; restart every process with the same command to resume",
          file=sys.__stderr__, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


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


def batch_layout(train_cfg, num_devices: int | None = None,
                 num_processes: int | None = None) -> BatchLayout:
    """From train.batch_size (global) or train.per_device_batch_size (> 0 wins), and
    train.grad_accum_steps."""
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
                f"--config.train.batch_size={global_batch} must be divisible by devices "
                f"({num_devices}) x --config.train.grad_accum_steps ({accum}); or set "
                f"--config.train.per_device_batch_size")
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
    """A global (B, ...) batch as one jax.Array split over the mesh; each process contributes its
    slice.

    Every process computes the same global batch from (seed, step) and keeps only
    its own rows, so no data moves between hosts.
    """
    nproc, pid = jax.process_count(), jax.process_index()
    local = np.asarray(global_rows).reshape(nproc, -1, *global_rows.shape[1:])[pid]
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local, global_rows.shape)


def replicate_host_array(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds identically, replicated on all devices (works
    multi-host)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])
