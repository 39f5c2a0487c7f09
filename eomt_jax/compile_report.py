"""Ahead-of-time compilation of the train step with a per-device memory and FLOPs report (`--mode=compile`).

Every training run prints the same report before its first step. With `target_topology` the step is compiled for
accelerators that are not attached (`mesh.topology_devices`, e.g. `tpu:v5e:4x4` with libtpu installed), so the
figures are the target compiler's own; the report is also written to `WORKDIR/compile_report.json`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from eomt_jax import config_lib
from eomt_jax import mesh as mesh_lib
from eomt_jax import train_step

log = logging.getLogger("eomt_jax")


def run(config: ml_collections.ConfigDict, workdir: str | Path, target_topology: str | None = None) -> dict[str, Any]:
    """Compile the train step for the config's mesh (on the local devices, or on `target_topology`'s) without
    any data or weights; report and return its per-device memory and FLOPs."""
    devices = mesh_lib.topology_devices(target_topology) if target_topology else None
    config = config_lib.resolve(config, Path(workdir).absolute())
    workdir = config_lib.prepare_workdir(config, workdir)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    if target_topology:
        log.info("compiling for %s: %d %s devices, mesh %s", target_topology, mesh.size,
                 mesh.devices.flat[0].device_kind, mesh_lib.describe(mesh))
    else:
        mesh_lib.log_processes(mesh)
    cfg = config_lib.model_config(config, platform=mesh.devices.flat[0].platform)
    setup = train_step.setup(config, cfg, mesh)
    report: dict[str, Any] = {}
    compile_and_report(setup.jit_step(), setup.abstract_state, setup.abstract_batch(), report,
                       setup.saved_activation_bytes())
    if jax.process_index() == 0:
        (workdir / "compile_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def compile_and_report(jitted_step, state, batch, report: dict[str, Any] | None = None,
                       activations: int | None = None):
    """Compile the step ahead of time, log its per-device memory and FLOPs, and return the executable.

    `state` and `batch` may be arrays or ShapeDtypeStructs with shardings. When `report` is a dict, the figures
    are stored in it too (bytes and FLOPs, per device, as XLA's compiler estimates them). `activations`: the bytes
    the backward pass keeps per device (`train_step.saved_activation_bytes`), reported with them.
    """
    devices = jax.tree.leaves(state)[0].sharding.device_set  # the state lives on the whole mesh
    figures: dict[str, Any] = {"devices": len(devices), "device_kind": next(iter(devices)).device_kind}
    if activations is not None:
        figures["saved_activations_bytes"] = activations
    t = time.perf_counter()
    try:
        compiled = jitted_step.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if report is None or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The compiler found the step larger than the device's memory: that is the report's answer.
        figures.update(fits=False, error=str(e).strip().splitlines()[0])
        log.error("the train step does not fit on %s: %s", figures["device_kind"], figures["error"])
        report.update(figures)
        return None
    seconds = time.perf_counter() - t
    figures.update(compile_seconds=seconds, fits=True)
    lines = [f"train step compiled in {seconds:.1f} s for {len(devices)} {figures['device_kind']} device(s)"]
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend reports memory
        mem = None
    if mem is not None:
        figures.update(
            arguments_bytes=mem.argument_size_in_bytes, temporaries_bytes=mem.temp_size_in_bytes,
            outputs_bytes=mem.output_size_in_bytes, aliased_bytes=mem.alias_size_in_bytes,
        )
        # Donated state buffers are reused for the new state: count them once.
        figures["total_bytes"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                                  - mem.alias_size_in_bytes)
        lines.append(
            f"per-device memory: arguments {_size(mem.argument_size_in_bytes)}, temporaries "
            f"{_size(mem.temp_size_in_bytes)}, outputs {_size(mem.output_size_in_bytes)} "
            f"(donated {_size(mem.alias_size_in_bytes)}), total {_size(figures['total_bytes'])}"
        )
    if activations is not None:
        lines.append(
            f"saved for the backward pass: {_size(activations)} per device (as the program is written; compilers "
            "may recompute or fuse some of it)"
        )
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    except Exception:
        cost = None
    if cost and "flops" in cost:
        figures["flops"] = float(cost["flops"])
        lines.append(f"FLOPs per step (XLA estimate, per device): {cost['flops'] / 1e9:.2f} GFLOP")
    for line in lines:
        log.info(line)
    if report is not None:
        report.update(figures)
    return compiled
