"""Timing of the JAX network and train step, as `python -m eomt_jax.benchmark` measures and reports it.

Steps are timed after warm-up, each synchronised with `block_until_ready`; FLOPs come from XLA's cost analysis and
MFU is held against the device's dense peak (`PEAK_TFLOPS`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eomt_jax import config_lib, train_step
from eomt_jax import mesh as mesh_lib
from eomt_jax.compile_report import compile_and_report
from eomt_jax.data.synthetic import random_train_batch
from eomt_jax.inference.postprocess import panoptic_postprocess
from eomt_jax.models.eomt import EoMT, EoMTConfig

# Dense bf16 peak TFLOP/s per chip (vendor figures, without sparsity); float32 matmuls on GPUs run as TF32 at most.
PEAK_TFLOPS = {
    "bfloat16": {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
                 "TPU v5p": 459.0},
    "float32": {"H100": 494.0, "H200": 494.0, "A100": 156.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                "TPU v5e": 197.0, "TPU v5p": 459.0},
}


def device_peak(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_TFLOPS[dtype].items():
        if name.lower() in kind.lower():
            return peak
    return None  # CPU and unknown devices: n/a


def timed(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return times


def summary(times: list[float], batch: int) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times)
    median = statistics.median(ms)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return {"images_per_s": batch / (median / 1e3), "ms_median": median, "ms_p90": p90}


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def jax_inference(cfg: EoMTConfig, batch: int, steps: int, warmup: int, seed: int = 0, postprocess: bool = False):
    """Time the jitted network on `batch` random images of `cfg.image_size` (masked attention off, as every
    evaluation runs it). With `postprocess`, also the network followed by the panoptic post-processing of its final
    prediction on the device (`inference.postprocess.panoptic_postprocess`, full-resolution segment maps), reported
    under "with_postprocess"."""
    model = EoMT(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)

    def network(state, images):
        masks, classes = nnx.merge(graphdef, state)(images, masked_attn=False)
        return masks[-1], classes[-1]

    images = jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (batch, *cfg.image_size, 3)), jnp.float32)
    out, _ = _time_compiled(jax.jit(network), (state, images), batch, steps, warmup)
    if postprocess:
        # Square inputs of the network's size: the letterboxed image is the whole input, at its own resolution.
        hw = jnp.broadcast_to(jnp.asarray(cfg.image_size, jnp.int32), (batch, 2))
        stuff = tuple(range(80, cfg.num_classes)) if cfg.num_classes == 133 else ()  # COCO panoptic: 53 stuff

        def segment(state, images):
            masks, classes = network(state, images)
            return panoptic_postprocess(masks, classes, hw, hw, image_size=cfg.image_size,
                                        canvas_hw=cfg.image_size, stuff_classes=stuff)

        out["with_postprocess"], _ = _time_compiled(jax.jit(segment), (state, images), batch, steps, warmup)
    return out, model, images


def _time_compiled(jitted, args, batch: int, steps: int, warmup: int) -> tuple[dict[str, Any], Any]:
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    out = summary(timed(lambda: compiled(*args), steps, warmup), batch)
    out.update(compile_s=compile_s, flops_per_step=flops)
    return out, compiled


def jax_training(config: ml_collections.ConfigDict, steps: int, warmup: int, trace_dir: str | Path | None = None,
                 trace_steps: int = 3):
    """The train step of `eomt_jax.train` (the same `train_step.setup`, shardings and compilation), timed on one
    random batch of the config's shapes (`eomt_jax.data.synthetic.random_train_batch`).

    With `trace_dir`, `trace_steps` more steps run under `jax.profiler.trace` (a trace for TensorBoard / Perfetto
    in that folder) and their most expensive operations are reported under "top_ops" (`top_ops`)."""
    mesh = mesh_lib.make_mesh(config.mesh)
    if config.data.batch_size % mesh.size:
        raise ValueError(f"--batch-size {config.data.batch_size} is not divisible by the {mesh.size} devices")
    cfg = config_lib.model_config(config)
    setup = train_step.setup(config, cfg, mesh)
    state = setup.new_state(config.seed)
    batch = random_train_batch(config.data, cfg.num_classes, setup.batch_sharding, config.seed)
    report: dict[str, Any] = {}
    compiled = compile_and_report(setup.jit_step(), state, batch, report)
    metrics = None

    def step():
        nonlocal state, metrics
        state, metrics = compiled(state, batch)  # the old state is donated: thread the new one through
        return metrics

    out = summary(timed(step, steps, warmup), config.data.batch_size)
    if trace_dir is not None:
        with jax.profiler.trace(str(trace_dir)):
            for _ in range(trace_steps):
                jax.block_until_ready(step())
        out["top_ops"] = top_ops(trace_dir)
        out["trace_steps"] = trace_steps
    out.update(
        compile_s=report["compile_seconds"],
        # XLA's estimate is per device (of the partitioned program), and so is the peak it is held against.
        flops_per_step=report.get("flops", 0.0) * mesh.size,
        flops_per_device=report.get("flops", 0.0),
        compiled_memory_gib=report["total_bytes"] / 2**30 if "total_bytes" in report else None,
        loss=float(metrics["train/loss"]),
        steps_taken=int(state["step"]),
    )
    return out, cfg, mesh, batch


def top_ops(trace_dir: str | Path, n: int = 15) -> list[dict[str, Any]]:
    """The `n` operations of the newest `jax.profiler` trace in `trace_dir` that took the most time in total.

    Device planes (GPU, TPU) are read when the trace has them, otherwise the host's XLA operations (CPU). Each
    entry: name (the XLA operation), count, total_ms, percent of all operations' time, and detail (XLA's longer
    description, where the trace records one, shortened)."""
    paths = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not paths:
        return []
    data = jax.profiler.ProfileData.from_file(str(paths[-1]))
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    totals: dict[str, list] = {}
    for plane in device or planes:
        for line in plane.lines:
            if device and line.name != "XLA Ops":
                continue
            for event in line.events:
                stats = dict(event.stats)
                if not device and "hlo_op" not in stats:
                    continue  # host threads also record thread-pool bookkeeping
                name = str(stats.get("hlo_op", event.name))
                entry = totals.setdefault(name, [0, 0.0, str(stats.get("long_name", stats.get("tf_op", "")))])
                entry[0] += 1
                entry[1] += event.duration_ns / 1e6
    grand = sum(e[1] for e in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": k, "count": c, "total_ms": ms, "percent": 100 * ms / grand, "detail": d[:120]}
            for k, (c, ms, d) in ranked]
