"""The ``data`` mesh that extraction and training shard their batches over.

DESIGN.md decision 4: one ``jax.sharding.Mesh`` with a ``data`` axis over every device;
batches are placed with ``NamedSharding(mesh, P("data"))`` and model variables are
replicated. Tested on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: every device).

    Auto axis types: jit propagates the batch sharding through the model, so library
    functions need no sharding annotations.
    """
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
