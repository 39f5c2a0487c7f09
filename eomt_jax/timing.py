"""Timing of the JAX network and train step, as `python -m eomt_jax.benchmark` measures and reports it.

Steps are timed after warm-up, each synchronised with `block_until_ready`; FLOPs come from XLA's cost analysis and
MFU is held against the device's dense peak (`PEAK_TFLOPS`).
"""

from __future__ import annotations

import statistics
import time
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


def jax_inference(cfg: EoMTConfig, batch: int, steps: int, warmup: int, seed: int = 0):
    model = EoMT(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, masked_attn=False))
    images = jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (batch, *cfg.image_size, 3)), jnp.float32)
    t = time.perf_counter()
    compiled = forward.lower(state, images).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    times = timed(lambda: compiled(state, images), steps, warmup)
    out = summary(times, batch)
    out.update(compile_s=compile_s, flops_per_step=flops)
    return out, model, images


def jax_training(config: ml_collections.ConfigDict, steps: int, warmup: int):
    """The train step of `eomt_jax.train` (the same `train_step.setup`, shardings and compilation), timed on one
    random batch of the config's shapes (`eomt_jax.data.synthetic.random_train_batch`)."""
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
