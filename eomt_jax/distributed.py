"""Multi-process start-up on JAX's own distributed runtime (TPU pods, SLURM, Open MPI, or explicit flags).

`--distributed=auto` lets `jax.distributed.initialize` detect the cluster (TPU pod metadata, SLURM or Open MPI
environment variables) and falls back to a single process when there is none; explicit
`--coordinator_address/--num_processes/--process_id` start any other set-up (e.g. plain multi-node GPUs);
`--distributed=off` never initialises.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import jax
import numpy as np

log = logging.getLogger("eomt_jax")

# Environment variables that mean "launched by a cluster manager JAX knows how to read".
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: str | None = None) -> None:
    """Start JAX's distributed runtime as the flags say (see the module docstring).

    `local_device_ids` ("0,1,2,3") names the accelerators this process drives. Under SLURM and Open MPI, JAX
    otherwise gives each process only the device numbered by its local rank (one process per GPU); pass all of
    a node's ids to run one process per node instead.
    """
    if mode not in ("auto", "off"):
        raise ValueError(f"--distributed must be 'auto' or 'off', got {mode!r}")
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    ids = None
    if local_device_ids:
        try:
            ids = [int(i) for i in local_device_ids.split(",")]
        except ValueError:
            raise ValueError(f"--local_device_ids must be comma-separated integers, got {local_device_ids!r}") from None
    if mode == "off":
        if explicit or ids is not None:
            raise ValueError("--distributed=off contradicts --coordinator_address/--num_processes/--process_id/"
                             "--local_device_ids")
        return
    if explicit:
        missing = [n for n, v in (("--coordinator_address", coordinator_address), ("--num_processes", num_processes),
                                  ("--process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"explicit multi-process start-up needs {', '.join(missing)} as well")
        # CPU devices of several processes talk through gloo collectives (ignored by GPU and TPU backends).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=ids)
    elif any(v in os.environ for v in _CLUSTER_ENV) or _on_tpu_pod():
        jax.distributed.initialize(local_device_ids=ids)
    elif ids is not None:
        raise ValueError("--local_device_ids needs a multi-process launch (a cluster manager or --coordinator_address)")
    log.info(
        "process %d of %d: %d local devices, %d global devices (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].device_kind,
    )


def _on_tpu_pod() -> bool:
    # A multi-host TPU slice sets TPU_WORKER_ID/TPU_WORKER_HOSTNAMES; a single TPU VM needs no initialisation.
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_sum(array: np.ndarray) -> np.ndarray:
    """The element-wise sum of `array` over all processes (same shape on every process)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array)).sum(axis=0)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (any picklable value), in process order, on every process."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return [pickle.loads(gathered[i, : sizes[i]].tobytes()) for i in range(len(sizes))]
