"""The ``data`` mesh that extraction and training shard their batches over.

DESIGN.md decision 4: one ``jax.sharding.Mesh`` with a ``data`` axis over every device;
batches are placed with ``NamedSharding(mesh, P("data"))`` and model variables are
replicated. Tested on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.

Several processes (hosts): after :func:`initialize_distributed`, ``jax.devices()`` lists
every process's devices, and the same code runs in each process. Training's mesh spans
all of them; each process loads only its part of a global batch (:func:`process_rows`)
and :func:`global_batch` assembles the global array
(``jax.make_array_from_process_local_data``). Extraction needs no communication: each
process describes its :func:`process_slice` of an image list on its own devices, and
:func:`gather_rows` concatenates the parts on every process
(``multihost_utils.process_allgather``). With one process every function here reduces
to the single-process behaviour. Tested with 2 local CPU processes
(tests/test_multihost.py).
"""

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
"""Environment variables :func:`initialize_distributed` reads (address ``host:port``)."""


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: every device of every process).

    Auto axis types: jit propagates the batch sharding through the model, so library
    functions need no sharding annotations.
    """
    if devices is None and jax.process_count() > 1:
        # Each process's devices adjacent, in process order: process p then holds rows
        # [p * B / P, (p + 1) * B / P) of every batch (what global_batch assumes).
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device.")
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``data`` axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (model variables)."""
    return NamedSharding(mesh, PartitionSpec())


def round_up_to_devices(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh size that is at least ``batch_size``."""
    count = mesh.devices.size
    return -(-batch_size // count) * count


def replicate(tree, mesh: Mesh):
    """``tree`` placed whole on every device of ``mesh`` (a jitted step's state).

    Placing the first state the way the step returns it keeps the step from compiling a
    second time for the second call.
    """
    return jax.device_put(tree, replicated(mesh))


# --- several processes ------------------------------------------------------------------


def initialize_distributed(
    coordinator_address: str | None = None,
    *,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> bool:
    """Joins a multi-process run (``jax.distributed.initialize``) if one is configured.

    Each argument defaults to its environment variable (:data:`DISTRIBUTED_ENV`):
    ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With none of them set this is a single-process run and nothing
    happens, so calling it first thing is always safe. On TPU pods, SLURM or Open MPI,
    where JAX detects everything itself, call ``jax.distributed.initialize()`` instead
    (this function then sees it done). Must run before any JAX computation.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator.
      num_processes: Processes in the run.
      process_id: This process's rank, in ``[0, num_processes)``.
      **kwargs: More ``jax.distributed.initialize`` arguments (``local_device_ids``,
        ``initialization_timeout``...).

    Returns:
      Whether the run has several processes (True also if already initialized).

    Raises:
      ValueError: Only some of the three settings are given.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(DISTRIBUTED_ENV[0])
    if num_processes is None and os.environ.get(DISTRIBUTED_ENV[1]):
        num_processes = int(os.environ[DISTRIBUTED_ENV[1]])
    if process_id is None and os.environ.get(DISTRIBUTED_ENV[2]):
        process_id = int(os.environ[DISTRIBUTED_ENV[2]])
    settings = (coordinator_address, num_processes, process_id)
    if all(value is None for value in settings):
        return False
    if any(value is None for value in settings):
        raise ValueError(
            "a multi-process run needs the coordinator address, the number of processes and "
            f"this process's id (env {', '.join(DISTRIBUTED_ENV)}); found {settings}."
        )
    jax.distributed.initialize(
        coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
    )
    return True


def process_slice(num_items: int) -> slice:
    """This process's contiguous share of ``num_items`` items (all of them with one process).

    Process p of P gets items ``[p * ceil(N / P), (p + 1) * ceil(N / P))``, clipped to N,
    so concatenating the shares in process order restores the original order.

    Examples:
      >>> process_slice(10)  # one process
      slice(0, 10, None)
    """
    share = -(-num_items // jax.process_count())
    start = min(jax.process_index() * share, num_items)
    return slice(start, min(start + share, num_items))


def gather_rows(rows: np.ndarray, num_items: int) -> np.ndarray:
    """Every process's rows for its :func:`process_slice` of ``num_items``, in order.

    A collective: every process must call it with the same ``num_items``, each with its
    own ``(len(process_slice(num_items)), ...)`` rows. The parts are padded to one size
    for ``process_allgather`` and trimmed after; every process gets the whole array.
    With one process, ``rows`` is returned unchanged.

    Raises:
      ValueError: ``rows`` does not have this process's number of rows.
    """
    part = process_slice(num_items)
    count = part.stop - part.start
    if len(rows) != count:
        raise ValueError(
            f"gather_rows: process {jax.process_index()} must give {count} rows (its slice "
            f"{part.start}:{part.stop} of {num_items}), found {len(rows)}."
        )
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    share = -(-num_items // jax.process_count())
    padded = np.zeros((share, *rows.shape[1:]), rows.dtype)
    padded[:count] = rows
    gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
    return gathered[:num_items]  # shares are padded only at the end of the last ones


def process_rows(batch_size: int) -> slice:
    """The rows of every global batch this process loads (all of them with one process).

    Raises:
      ValueError: ``batch_size`` is not a multiple of the number of processes.
    """
    count = jax.process_count()
    if batch_size % count:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the {count} processes.")
    local = batch_size // count
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """A pytree of batch arrays placed on ``mesh``, split over the ``data`` axis.

    One process: ``jax.device_put(local_batch, batch_sharding(mesh))``. Several: each
    process passes its :func:`process_rows` of the global batch, and the result is the
    global array (``jax.make_array_from_process_local_data``), leading axis
    ``process_count`` times longer. The mesh must list each process's devices together
    and in process order, as :func:`data_mesh` does.
    """
    placement = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(local_batch, placement)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(placement, np.asarray(x)), local_batch
    )
