"""Device mesh and shardings from the config.

`config.mesh` is a sequence of (axis name, size) with at most one -1 ("the remaining devices"). The batch is split over
every axis; parameters are replicated unless a sharding rule says otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from eomt_jax import gpu_targets
from eomt_jax.tree import path_str


def make_mesh(spec: Sequence[Sequence], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(str(name) for name, _ in spec)
    sizes = [int(size) for _, size in spec]
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh has repeated axis names: {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh may use -1 for one axis only: {list(spec)}")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or len(devices) % known:
        raise ValueError(f"config.mesh {list(spec)} does not divide the {len(devices)} available devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"config.mesh {list(spec)} -> {sizes} uses {math.prod(sizes)} of {len(devices)} devices")
    # Auto axes: classic GSPMD propagation (explicit-mode axes reject the model's reshapes of sharded batches).
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def topology_devices(name: str) -> list:
    """Compile-only devices of an accelerator topology: "tpu:<chip>:<shape>" (tpu:v5e:4x4, tpu:v4:2x2x2,
    tpu:v5p:2x2x4) or "gpu:<model>:<count>" / "gpu:<model>:<hosts>x<count per host>" (gpu:h100:4, gpu:a100:2x8;
    models: `gpu_targets.GPU_TARGETS`).

    They need no hardware, only the platform's compiler: TPU topologies work on any machine with libtpu installed
    (`pip install -e ".[tpu]"`), GPU ones with the CUDA plugin (`pip install -e ".[cuda]"`, run with
    `JAX_PLATFORMS=cpu`). Programs compiled for them report the target compiler's own memory use.
    """
    platform, _, topology = name.partition(":")
    if platform == "tpu" and topology:
        return _tpu_devices(name, topology)
    if platform == "gpu" and topology:
        return _gpu_devices(name)
    raise ValueError(
        f"--target_topology must name a TPU topology as tpu:<chip>:<shape> (tpu:v5e:4x4, tpu:v4:2x2x2, "
        f"tpu:v5p:2x2x1) or GPUs as gpu:<model>:<count> (gpu:h100:4, gpu:a100:2x8), got {name!r}"
    )


def _tpu_devices(name: str, topology: str) -> list:
    from jax.experimental import topologies

    # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore"), as on the real machines.
    chip_config = "megacore" if topology.split(":")[0] in ("v4", "v5p") else "default"
    try:
        return list(topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name=chip_config).devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise RuntimeError(
                f"--target_topology={name} needs the TPU compiler (libtpu), which is not installed: "
                'pip install -e ".[tpu]" in the eomt_jax checkout (no TPU is needed)'
            ) from e
        raise ValueError(f"cannot describe --target_topology={name} (tpu:<chip>:<shape>, e.g. tpu:v5e:4x4): {e}") from e


def parse_gpu_topology(name: str) -> tuple[str, int, int]:
    """"gpu:h100:4" -> ("h100", 1, 4); "gpu:h100:2x8" -> ("h100", 2, 8): the model, hosts, GPUs per host."""
    parts = name.split(":")
    shape = parts[2].lower().split("x") if len(parts) == 3 and parts[0] == "gpu" else []
    if len(shape) not in (1, 2) or not all(s.isdigit() and int(s) > 0 for s in shape):
        raise ValueError(f"a GPU target is gpu:<model>:<count> or gpu:<model>:<hosts>x<count> (gpu:h100:4, "
                         f"gpu:a100:2x8), got {name!r}")
    gpu_targets.target_config(parts[1])  # a known model
    hosts, per_host = (1, int(shape[0])) if len(shape) == 1 else (int(shape[0]), int(shape[1]))
    return parts[1].lower(), hosts, per_host


def _cuda_plugin_installed() -> bool:
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    return any(importlib.util.find_spec(f"jax_plugins.{p}") for p in ("xla_cuda12", "xla_cuda13"))


def _gpu_devices(name: str) -> list:
    model, hosts, per_host = parse_gpu_topology(name)
    if not _cuda_plugin_installed():
        raise RuntimeError(
            f"--target_topology={name} needs the CUDA plugin and its compiler, which are not installed: "
            'pip install -e ".[cuda]" in the eomt_jax checkout (no GPU is needed)')
    from jax.experimental import topologies

    # Without a GPU the CUDA plugin registers (and describes topologies) only when JAX is not asked to start a CUDA
    # backend: JAX_PLATFORMS=cpu. Set it here when no backend has started yet.
    if not jax.config.jax_platforms:
        try:
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:  # backends already started: the user's JAX_PLATFORMS decides
            pass
    try:
        topology = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                                target_config=gpu_targets.target_config(model))
    except NotImplementedError as e:
        raise RuntimeError(
            f"--target_topology={name}: the CUDA plugin did not start, so it cannot describe GPUs; without a GPU "
            "run with JAX_PLATFORMS=cpu set in the environment") from e
    return list(topology.devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def log_processes(mesh: Mesh) -> None:
    """Log this process's place in the run: its index, its local and the global device counts, the mesh."""
    logging.getLogger("eomt_jax").info(
        "process %d/%d, %d local / %d global devices, mesh %s", jax.process_index(), jax.process_count(),
        jax.local_device_count(), jax.device_count(), describe(mesh))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{n}={s}" for n, s in mesh.shape.items())


# Default sharding rules: (regex searched in the leaf path, action). The first match wins; "fsdp" shards the
# leaf's largest axis divisible by the fsdp axis size when the leaf has at least `min_size` elements.
SHARDING_RULES = (
    (r"(^|/)(step|rng)$", "replicate"),
    (r".*", "fsdp"),
)


def state_shardings(abstract_tree, mesh: Mesh, rules=SHARDING_RULES, min_size: int = 2**18):
    """NamedShardings for a tree of arrays / ShapeDtypeStructs (parameters, optimizer state, ...)."""
    compiled = [(re.compile(p), a) for p, a in rules]
    for _, action in compiled:
        if action not in ("fsdp", "replicate"):
            raise ValueError(f"sharding rule action must be 'fsdp' or 'replicate', got {action!r}")
    fsdp = mesh.shape.get("fsdp", 1)

    def pick(path, leaf):
        name = path_str(path)
        action = next((a for rx, a in compiled if rx.search(name)), "replicate")
        shape = tuple(getattr(leaf, "shape", ()))
        if action == "replicate" or fsdp == 1 or math.prod(shape) < min_size:
            return NamedSharding(mesh, P())
        axes = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in axes:
            if shape[i] % fsdp == 0:
                spec = [None] * len(shape)
                spec[i] = "fsdp"
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)
