"""Ahead-of-time compilation of the train step with a per-device memory and FLOPs report (`--mode=compile`).

Every training run prints the same report before its first step. `--mode=compile` also compiles the network for
inference (one image per device, masked attention off) and reports it under "inference". With `target_topology`
both are compiled for accelerators that are not attached (`mesh.topology_devices`: `tpu:v5e:4x4` with libtpu
installed, `gpu:h100:4` with the CUDA plugin), so the figures are the target compiler's own; the report is also
written to `WORKDIR/compile_report.json`.

For GPUs the report lists the attention kernels of each compiled program (`attention_kernels`): how many
attention calls became cuDNN fused-attention custom calls, by kind. Compiled without a GPU, XLA decides the kernel
and plans the memory but skips building cuDNN's graphs (no workspace is sized), so such an executable is for
reading, not for running.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from eomt_jax import config_lib
from eomt_jax import mesh as mesh_lib
from eomt_jax import train_step
from eomt_jax.models.eomt import EoMT, EoMTConfig

log = logging.getLogger("eomt_jax")


def run(config: ml_collections.ConfigDict, workdir: str | Path, target_topology: str | None = None) -> dict[str, Any]:
    """Compile the train step for the config's mesh (on the local devices, or on `target_topology`'s) without
    any data or weights, and the network for inference at one image per device; report and return their
    per-device memory and FLOPs (the inference figures under "inference").

    For GPUs that are not attached, two parts of the step are compiled as equivalents that need no device: the
    on-device matcher for the host one (`_without_host_callbacks`) and XLA's sort for CUB's
    (`DEVICELESS_GPU_OPTIONS`)."""
    devices = mesh_lib.topology_devices(target_topology) if target_topology else None
    options = None
    if devices and devices[0].platform == "gpu":
        config = _without_host_callbacks(config)
        options = DEVICELESS_GPU_OPTIONS
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
                       setup.saved_activation_bytes(), compiler_options=options)
    report["inference"] = {}
    compile_inference(cfg, mesh, report["inference"], compiler_options=options)
    if jax.process_index() == 0:
        (workdir / "compile_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# XLA options for compiling for a GPU that is not attached. The CUB radix sort that XLA puts in place of large
# sorts (the loss's top-k point selection) asks the device for its scratch size while compiling
# ("cudaErrorInvalidDevice: invalid device ordinal"); XLA's own sort kernel needs no device.
DEVICELESS_GPU_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}


def _without_host_callbacks(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with the on-device Hungarian matcher where it names the host one (scipy).

    jax 0.10 cannot lower a host callback (`jax.pure_callback`) for a GPU that is not attached: the lowering asks
    for the live GPU client (jax/_src/callback.py, `emit_python_callback`: "Unknown backend: 'gpu' requested").
    The on-device matcher computes the same assignment; its device memory is a few MB of cost matrices and
    indices, next to gigabytes of activations.
    """
    if config.loss.matcher != "scipy":
        return config
    log.warning("compiling with config.loss.matcher=optax instead of scipy: the scipy matcher's host callback "
                "cannot be lowered for a GPU that is not attached")
    config = config.copy_and_resolve_references()
    config.loss.matcher = "optax"
    return config


def compile_inference(cfg: EoMTConfig, mesh, report: dict[str, Any] | None = None, images_per_device: int = 1,
                      compiler_options: dict[str, Any] | None = None):
    """Compile the network's forward pass for inference (masked attention off, as every evaluation runs it) on
    `images_per_device` images per device of `mesh`, weights replicated; log and return its per-device memory
    and, on GPUs, its attention kernels. Nothing is materialised."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: EoMT(cfg, rngs=nnx.Rngs(0))))
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
    batch = images_per_device * mesh.size
    images = jax.ShapeDtypeStruct((batch, *cfg.image_size, 3), jnp.float32, sharding=mesh_lib.batch_sharding(mesh))

    def forward(state, images):
        mask_logits, class_logits = nnx.merge(graphdef, state)(images, masked_attn=False)
        return mask_logits[-1], class_logits[-1]

    return compile_and_report(jax.jit(forward), state, images, report, what="inference forward",
                              compiler_options=compiler_options)


def attention_kernels(compiled) -> dict[str, int]:
    """Fused-attention custom calls in a compiled program, by kind (e.g. "cudnn fmhaSoftmax": 20): each is one
    attention call on cuDNN's flash-attention kernel; attention calls not counted here run as XLA's own fusions,
    with the full score matrix in memory. Empty for programs without any (CPUs, TPUs, XLA attention)."""
    text = compiled.as_text() or ""
    calls = re.findall(r'custom_call_target="__cudnn\$(fmha[A-Za-z]*)"', text)
    return dict(sorted(collections.Counter(f"cudnn {c}" for c in calls).items()))


def _compile(lowered, compiler_options: dict[str, Any] | None, figures: dict[str, Any]):
    """`lowered.compile(compiler_options)`; for a GPU that is not attached, once more without Triton GEMMs when
    XLA's default Triton tiling does not fit a matrix product (without a GPU XLA cannot autotune, and for some
    shapes its untuned default has no valid tiling: "Couldn't find output tile sizes"). The options used are
    recorded in `figures`."""
    try:
        return lowered.compile(compiler_options)
    except jax.errors.JaxRuntimeError as e:
        if compiler_options is None or "Couldn't find output tile sizes" not in str(e):
            raise
    compiler_options = {**compiler_options, "xla_gpu_enable_triton_gemm": False}
    log.warning("XLA's untuned Triton tiling does not fit a matrix product of this program; compiling with "
                "xla_gpu_enable_triton_gemm=false (cuBLAS for every matrix product)")
    figures["compiler_options"] = compiler_options
    return lowered.compile(compiler_options)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def compile_and_report(jitted_step, state, batch, report: dict[str, Any] | None = None,
                       activations: int | None = None, what: str = "train step",
                       compiler_options: dict[str, Any] | None = None):
    """Compile the step ahead of time, log its per-device memory and FLOPs, and return the executable.

    `state` and `batch` may be arrays or ShapeDtypeStructs with shardings. When `report` is a dict, the figures
    are stored in it too (bytes and FLOPs, per device, as XLA's compiler estimates them; the fused-attention
    kernels, `attention_kernels`). `activations`: the bytes the backward pass keeps per device
    (`train_step.saved_activation_bytes`), reported with them. `what` names the program in the log;
    `compiler_options`: XLA options for this compilation (`DEVICELESS_GPU_OPTIONS`).
    """
    devices = jax.tree.leaves(state)[0].sharding.device_set  # the state lives on the whole mesh
    figures: dict[str, Any] = {"devices": len(devices), "device_kind": next(iter(devices)).device_kind}
    if activations is not None:
        figures["saved_activations_bytes"] = activations
    t = time.perf_counter()
    try:
        compiled = _compile(jitted_step.lower(state, batch), compiler_options, figures)
    except jax.errors.JaxRuntimeError as e:
        if report is None or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The compiler found the step larger than the device's memory: that is the report's answer.
        figures.update(fits=False, error=str(e).strip().splitlines()[0])
        log.error("the %s does not fit on %s: %s", what, figures["device_kind"], figures["error"])
        report.update(figures)
        return None
    seconds = time.perf_counter() - t
    figures.update(compile_seconds=seconds, fits=True)
    lines = [f"{what} compiled in {seconds:.1f} s for {len(devices)} {figures['device_kind']} device(s)"]
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
    # Only GPU programs have fused-attention kernels; other programs' text is not worth printing (tens of MB).
    kernels = attention_kernels(compiled) if next(iter(devices)).platform == "gpu" else {}
    if kernels:
        figures["attention_kernels"] = kernels
        lines.append("fused attention: " + ", ".join(f"{n} x {k}" for k, n in kernels.items()))
    for line in lines:
        log.info(line)
    if report is not None:
        report.update(figures)
    return compiled
