"""Data parallelism with ``NamedSharding``: one ``('data',)`` mesh over every device of every host.

The train state is replicated (``P()``), the batch is split along its leading axis
(``P('data')``). On several hosts each process loads only its share of every global batch and
:func:`shard_batch` assembles the global array with ``jax.make_array_from_process_local_data``.

Multi-host launch: every process runs the same command after :func:`initialize_distributed`
(``--coordinator host:port --num-processes N --process-id i`` on the CLI; on Cloud TPU and SLURM
``jax.distributed.initialize()`` finds these itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """``jax.distributed.initialize`` for multi-host runs; returns whether it ran.

    Must run before any other JAX call. Explicit arguments (plain GPU hosts, localhost tests) or
    ``auto=True`` (Cloud TPU, SLURM, Open MPI: JAX detects the cluster) start it; otherwise this is
    a single-process run and nothing happens.
    """
    explicit = coordinator_address is not None or num_processes is not None
    if not (explicit or auto):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``('data',)`` mesh over ``devices`` (default: every device of every process).

    Devices are ordered by process, so process ``i`` holds the ``i``-th contiguous block of each
    global batch: exactly the rows the data pipeline gives it (``shard_index=i``).
    """
    devs = jax.devices() if devices is None else list(devices)
    devs = sorted(devs, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devs), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (train state)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` on every device of ``mesh`` (works across hosts).

    Every process must pass the same values (e.g. initialised from the same seed).
    """
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of a global batch; checks that it splits evenly over the devices."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch_size % n_dev:
        raise ValueError(
            f"batch size {global_batch_size} must be a multiple of the number of devices ({n_dev})"
        )
    return global_batch_size // n_proc


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays sharded along the batch axis from this process's rows of the batch."""
    sharding = data_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def to_host(tree: Any) -> Any:
    """Numpy copies of replicated arrays (works when other hosts hold devices of the mesh too)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
