"""`python -m eomt_jax.benchmark`: throughput of the network or of its training step (and, with --compare-torch,
of the PyTorch EoMT).

    python -m eomt_jax.benchmark --size L --image-size 640 --batch-size 1 --dtype float32 --steps 10 --compare-torch
    python -m eomt_jax.benchmark --config configs/coco_panoptic_large.py --dtype bfloat16 --batch-size 8
    python -m eomt_jax.benchmark --mode=train --config configs/coco_panoptic_large.py --batch-size 16 --compare-torch

Prints images/s, ms per step (median and p90 over the timed steps, after warm-up, each step synchronised with
`block_until_ready`), compile time, peak device memory where the backend reports it, and the achieved TFLOP/s
and MFU from XLA's cost analysis against the device's peak; the last line is the same report as JSON.

--mode=inference (default) times the forward pass on one device, masked attention off, as in every published
evaluation. The PyTorch comparison runs the `transformers` EoMT with the same shape and the same weights in the same
process (`torch.compile` where it works), masked attention off on both sides, under bf16 autocast when `--dtype
bfloat16`.

--mode=train times the jitted train step of `eomt_jax.train` (forward with masked attention, Hungarian matching,
point-sampled losses, backward, clipped AdamW with layer-wise LR decay; state donated) on one synthetic batch of the
config's shapes: `--batch-size` images (default: config.data.batch_size, the global batch) sharded over every
device of `config.mesh`, `config.data.max_instances` target slots of which a few hold rectangles, and the config's
loss (points, matcher), annealing and optimizer. Without --config, the COCO panoptic experiment of `--size` (100
slots, 12544 points). `--dtype` sets the compute dtype (parameters and optimizer state stay float32; default: the
config's). The PyTorch comparison times the `transformers` EoMT's own training step on the same batch: its loss
and Hungarian matcher, AdamW with the config's settings and gradient clipping, autocast to bfloat16 with
`--dtype bfloat16`; its initialisation is its own (the cost of a step does not depend on the weights).

With --compare-torch, JAX does not preallocate device memory (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set), so
that PyTorch, which runs second in the same process, gets what JAX's pool has not taken: compare at a batch that fits
twice.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eomt_jax.models.eomt import EoMT, EoMTConfig, preset

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


def hf_config(c: EoMTConfig, **overrides):
    """The `transformers` EomtConfig of the same architecture (`overrides`: loss settings and the like)."""
    from transformers import EomtConfig

    if c.image_size[0] != c.image_size[1]:
        raise ValueError("--compare-torch needs a square image size (the transformers EoMT is square only)")
    if c.mlp_type == "gelu" and c.mlp_hidden % c.embed_dim:
        raise ValueError("--compare-torch needs an MLP width that is a multiple of the embedding width")
    return EomtConfig(
        hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads, num_blocks=c.num_blocks,
        num_queries=c.num_queries, image_size=c.image_size[0], patch_size=c.patch_size,
        num_register_tokens=c.num_registers, num_labels=c.num_classes, num_upscale_blocks=c.num_upscale,
        use_swiglu_ffn=c.mlp_type == "swiglu", layer_norm_eps=c.layer_norm_eps, layerscale_value=c.layerscale_init,
        mlp_ratio=c.mlp_hidden // c.embed_dim if c.mlp_type == "gelu" else 4, **overrides,
    )


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_pixels(images: np.ndarray, device):
    """(B, H, W, 3) floats in [0, 1] -> the ImageNet-normalised (B, 3, H, W) tensor the transformers EoMT takes
    (ours normalises inside the network)."""
    import torch

    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = ((np.asarray(images, np.float32) - mean) / std).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def torch_timed(fn: Callable[[], Any], steps: int, warmup: int, device) -> list[float]:
    """`timed` for PyTorch: each step waits for the device."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def torch_compiled(module, call: Callable[[Any], Any], compile: bool):
    """`torch.compile(module)` when it runs `call` (a first call), else the eager module; and whether it compiled."""
    import torch

    if compile:
        try:
            fn = torch.compile(module)
            call(fn)
            return fn, True
        except Exception as e:  # no compiler toolchain, unsupported op, ...
            print(f"torch.compile unavailable ({type(e).__name__}); timing eager PyTorch", file=sys.stderr)
    return module, False


def torch_inference(model: EoMT, images: jax.Array, steps: int, warmup: int, compile: bool = True):
    """The transformers EoMT with our weights (converted back to its layout), timed on the same inputs."""
    import torch
    from transformers import EomtForUniversalSegmentation

    c = model.config
    device = torch_device()
    torch_model = EomtForUniversalSegmentation(hf_config(c)).eval()
    if c.mlp_type == "gelu":  # same weights; the giant's SwiGLU widths differ between the two implementations
        torch_model.load_state_dict(to_hf_state_dict(model), strict=False)  # buffers keep their values
    torch_model.attn_mask_probs.zero_()  # no masks, no intermediate heads: the published evaluation setting
    torch_model.to(device)
    pixel = torch_pixels(images, device)
    # Like for like: a bfloat16 network on our side (bf16 weights and products) is PyTorch's bf16 autocast on its
    # side (weights rounded to bf16 for each product; softmax and normalisations in float32 on both sides).
    bf16 = jnp.dtype(c.dtype) == jnp.bfloat16

    def run(f):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return f(pixel_values=pixel).masks_queries_logits

    fn, compiled = torch_compiled(torch_model, run, compile)

    def step():
        return run(fn)

    out = summary(torch_timed(step, steps, warmup, device), pixel.shape[0])
    out["torch_compile"] = compiled
    if c.mlp_type == "gelu":
        # Same weights and inputs: the outputs must agree, or the comparison is not like for like.
        ours = np.asarray(model(images, masked_attn=False)[0][-1], np.float32)
        out["max_abs_diff"] = float(np.abs(step().float().cpu().numpy() - ours).max())
    out["dtype"] = "bfloat16 (autocast)" if bf16 else "float32"
    return out


def to_hf_state_dict(model: EoMT) -> dict[str, Any]:
    """Our parameters in the transformers EoMT layout (GELU backbones)."""
    import torch

    from eomt_jax.tree import flatten_paths

    _, params, _ = nnx.split(model, nnx.Param, ...)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_paths(params).items()}
    sd: dict[str, np.ndarray] = {
        "embeddings.cls_token": flat["backbone/cls_token"],
        "embeddings.position_embeddings.weight": flat["backbone/pos_embed"][0],
        "embeddings.patch_embeddings.projection.weight": flat["backbone/patch_embed/proj/kernel"].transpose(3, 2, 0, 1),
        "embeddings.patch_embeddings.projection.bias": flat["backbone/patch_embed/proj/bias"],
        "layernorm.weight": flat["backbone/norm/scale"],
        "layernorm.bias": flat["backbone/norm/bias"],
        "query.weight": flat["q/embedding"],
        "class_predictor.weight": flat["class_head/kernel"].T,
        "class_predictor.bias": flat["class_head/bias"],
    }
    if "backbone/reg_token" in flat:
        sd["embeddings.register_tokens"] = flat["backbone/reg_token"]
    for i in range(model.config.depth):
        b = f"backbone/blocks/{i}/"
        qkv_w, qkv_b = flat[b + "attn/qkv/kernel"].T, flat[b + "attn/qkv/bias"]
        for j, n in enumerate("qkv"):
            d = model.config.embed_dim
            sd[f"layers.{i}.attention.{n}_proj.weight"] = qkv_w[j * d : (j + 1) * d]
            sd[f"layers.{i}.attention.{n}_proj.bias"] = qkv_b[j * d : (j + 1) * d]
        sd[f"layers.{i}.attention.out_proj.weight"] = flat[b + "attn/proj/kernel"].T
        sd[f"layers.{i}.attention.out_proj.bias"] = flat[b + "attn/proj/bias"]
        for n in ("norm1", "norm2"):
            sd[f"layers.{i}.{n}.weight"] = flat[b + f"{n}/scale"]
            sd[f"layers.{i}.{n}.bias"] = flat[b + f"{n}/bias"]
        sd[f"layers.{i}.layer_scale1.lambda1"] = flat[b + "ls1/gamma"]
        sd[f"layers.{i}.layer_scale2.lambda1"] = flat[b + "ls2/gamma"]
        for n in ("fc1", "fc2"):
            sd[f"layers.{i}.mlp.{n}.weight"] = flat[b + f"mlp/{n}/kernel"].T
            sd[f"layers.{i}.mlp.{n}.bias"] = flat[b + f"mlp/{n}/bias"]
    for j in range(3):
        sd[f"mask_head.fc{j + 1}.weight"] = flat[f"mask_head/fc{j + 1}/kernel"].T
        sd[f"mask_head.fc{j + 1}.bias"] = flat[f"mask_head/fc{j + 1}/bias"]
    for j in range(model.config.num_upscale):
        u = f"upscale/{j}/"
        sd[f"upscale_block.block.{j}.conv1.weight"] = flat[u + "conv1/kernel"].transpose(2, 3, 0, 1)
        sd[f"upscale_block.block.{j}.conv1.bias"] = flat[u + "conv1/bias"]
        sd[f"upscale_block.block.{j}.conv2.weight"] = flat[u + "conv2/kernel"].transpose(3, 2, 0, 1)
        sd[f"upscale_block.block.{j}.layernorm2d.weight"] = flat[u + "norm/scale"]
        sd[f"upscale_block.block.{j}.layernorm2d.bias"] = flat[u + "norm/bias"]
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}


def build_config(args) -> EoMTConfig:
    if args.config:
        from eomt_jax.conversion import load_config_file
        from eomt_jax.config_lib import model_config

        cfg = model_config(load_config_file(args.config))
        if args.image_size:
            cfg = cfg.replace(image_size=args.image_size)
    else:
        cfg = preset(args.size, num_classes=args.num_classes, num_queries=args.num_queries,
                     image_size=args.image_size or 640)
    return cfg.replace(dtype=args.dtype, param_dtype=args.dtype if args.dtype == "bfloat16" else "float32",
                       attention=args.attention, masked_attn_enabled=False)


def train_config(args) -> ml_collections.ConfigDict:
    """The experiment of --mode=train: the --config file, or the COCO panoptic experiment of --size; with the
    command line's image size, global batch, compute dtype and attention where given."""
    from eomt_jax import config_lib

    if args.config:
        from eomt_jax.conversion import load_config_file

        config = load_config_file(args.config)
    else:
        # The 12-epoch COCO schedule of configs/coco_panoptic_*.py, one phase per masked block; where the phases
        # lie does not change the cost of a step.
        k = preset(args.size, num_classes=args.num_classes, num_queries=args.num_queries, image_size=640).num_blocks
        per_epoch = config_lib.STEPS_PER_EPOCH["coco"]
        starts = tuple(round(per_epoch * (2 + 6 * j / max(k - 1, 1))) for j in range(k))
        config = config_lib.experiment(
            task="panoptic", dataset="coco_panoptic", size=args.size, image_size=args.image_size or 640,
            num_classes=args.num_classes, num_queries=args.num_queries, epochs=12, anneal_starts=starts,
            anneal_ends=tuple(s + 2 * per_epoch for s in starts),
        )
    with config.unlocked():
        if args.image_size:
            config.data.image_size = args.image_size
            config.model.image_size = (args.image_size, args.image_size)
        if args.batch_size:
            config.data.batch_size = args.batch_size
        if args.dtype:
            config.model.dtype = args.dtype  # the compute dtype; parameters stay as the config has them (float32)
        if args.attention:
            config.model.attention = args.attention
    return config


def synthetic_batch(config: ml_collections.ConfigDict, sharding, seed: int = 0) -> dict[str, jax.Array]:
    """One global training batch of the config's shapes (`eomt_jax.data.TRAIN_KEYS`): random images, one to
    eight random rectangles per image in its first target slots, the other slots padding. Each process makes
    its own rows; the masks are drawn on the devices, already sharded."""
    from eomt_jax.config_lib import model_config

    rows = config.data.batch_size // jax.process_count()
    s, m = config.data.image_size, config.data.max_instances
    rng = np.random.default_rng([seed, jax.process_index()])
    valid = np.arange(m)[None] < rng.integers(1, min(m, 8) + 1, (rows, 1))
    lo = rng.integers(0, s // 2, (rows, m, 2))
    hi = lo + rng.integers(max(s // 16, 1), s // 2 + 1, (rows, m, 2))
    host = {
        "image": rng.integers(0, 256, (rows, s, s, 3), dtype=np.uint8),
        "labels": rng.integers(0, model_config(config).num_classes, (rows, m)).astype(np.int32),
        "valid": valid,
        "is_crowd": np.zeros((rows, m), bool),
        "boxes": np.concatenate([lo, hi], axis=-1).astype(np.int32),
    }
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}

    def rectangles(boxes, valid):
        y, x = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
        b = boxes[..., None, None]
        return (y >= b[:, :, 0]) & (y < b[:, :, 2]) & (x >= b[:, :, 1]) & (x < b[:, :, 3]) & valid[..., None, None]

    batch["masks"] = jax.jit(rectangles, out_shardings=sharding)(batch.pop("boxes"), batch["valid"])
    return batch


def jax_training(config: ml_collections.ConfigDict, steps: int, warmup: int):
    """The train step of `eomt_jax.train` (same state, shardings, step and compilation), timed on one batch."""
    from eomt_jax import data as data_lib
    from eomt_jax import mesh as mesh_lib
    from eomt_jax import train
    from eomt_jax.config_lib import model_config
    from eomt_jax.train_step import StepConfig, make_train_step

    mesh = mesh_lib.make_mesh(config.mesh)
    if config.data.batch_size % mesh.size:
        raise ValueError(f"--batch-size {config.data.batch_size} is not divisible by the {mesh.size} devices")
    cfg = model_config(config)
    graphdef, tx, lrs, init_state, _, state_sharding = train.model_and_optimizer(config, cfg, mesh)
    state = jax.jit(init_state, static_argnums=0, out_shardings=state_sharding)(config.seed)
    # The update-step section of `train.run`.
    step_cfg = StepConfig(
        num_classes=cfg.num_classes,
        anneal_starts=tuple(config.anneal.starts),
        anneal_ends=tuple(config.anneal.ends),
        anneal_power=config.anneal.power,
        loss_kwargs=dict(config.loss.to_dict()),
        grad_accum_steps=config.grad_accum_steps,
        remat=config.remat,
    )
    batch_sharding = mesh_lib.batch_sharding(mesh)
    p_step = jax.jit(
        make_train_step(graphdef, tx, step_cfg, lr_fn=lrs.groups_at, mesh=mesh),
        in_shardings=(state_sharding, {k: batch_sharding for k in data_lib.TRAIN_KEYS}),
        out_shardings=(state_sharding, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    batch = synthetic_batch(config, batch_sharding, config.seed)
    report: dict[str, Any] = {}
    compiled = train.compile_and_report(p_step, state, batch, report)
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


def torch_training(config: ml_collections.ConfigDict, cfg: EoMTConfig, batch: dict[str, jax.Array], steps: int,
                   warmup: int, compile: bool = True):
    """The transformers EoMT's training step (its loss, matcher and point sampling; AdamW, gradient clipping)."""
    import torch
    from transformers import EomtForUniversalSegmentation

    loss, o = config.loss, config.optim
    device = torch_device()
    model = EomtForUniversalSegmentation(hf_config(
        cfg, train_num_points=loss.num_points, oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio, no_object_weight=loss.no_object_coefficient,
        class_weight=loss.class_coefficient, mask_weight=loss.mask_coefficient, dice_weight=loss.dice_coefficient,
    )).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    host = jax.device_get(batch)
    pixel = torch_pixels(host["image"] / 255.0, device)
    valid = host["valid"]
    mask_labels = [torch.from_numpy(host["masks"][i][valid[i]]).float().to(device) for i in range(len(valid))]
    class_labels = [torch.from_numpy(host["labels"][i][valid[i]]).long().to(device) for i in range(len(valid))]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def forward(fn):
        with autocast:
            return fn(pixel_values=pixel, mask_labels=mask_labels, class_labels=class_labels).loss

    fn, compiled = torch_compiled(model, forward, compile)
    last = None

    def step():
        nonlocal last
        last = forward(fn)
        last.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = summary(torch_timed(step, steps, warmup, device), pixel.shape[0])
    out.update(torch_compile=compiled, loss=float(last.detach()), device=str(device))
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def jax_line(res: dict[str, Any], tflops: float, mfu: float | None) -> str:
    return (f"jax     {res['images_per_s']:8.2f} img/s  median {res['ms_median']:8.1f} ms  p90 {res['ms_p90']:8.1f} ms"
            f"  compile {res['compile_s']:.1f} s  {tflops:.2f} TFLOP/s" + (f"  MFU {100 * mfu:.1f}%" if mfu else "  MFU n/a"))


def torch_line(res: dict[str, Any], details: str) -> str:
    return (f"torch   {res['images_per_s']:8.2f} img/s  median {res['ms_median']:8.1f} ms  p90 {res['ms_p90']:8.1f} ms"
            f"  ({details})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m eomt_jax.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="config file[:arg]; its model section sets the architecture (--mode=train: "
                                    "also the data shapes, loss, annealing, optimizer and mesh)")
    p.add_argument("--size", default="L", choices=["S", "B", "L", "g"])
    p.add_argument("--image-size", type=int, default=0, help="square input size (default: the config's, or 640)")
    p.add_argument("--num-classes", type=int, default=133)
    p.add_argument("--num-queries", type=int, default=200)
    p.add_argument("--mode", default="inference", choices=["inference", "train"])
    p.add_argument("--batch-size", type=int, default=0,
                   help="global batch (default: 1; --mode=train: config.data.batch_size)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32; --mode=train: the config's)")
    p.add_argument("--attention", choices=["plain", "fused"], help="(default: plain; --mode=train: the config's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--no-torch-compile", action="store_true", help="time eager PyTorch only")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.compare_torch:
        # Takes effect only if the JAX backend has not started yet (it has not, when run from the command line).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.mode == "train":
        return train_main(args)
    args.batch_size = args.batch_size or 1
    args.dtype = args.dtype or "float32"
    args.attention = args.attention or "plain"
    cfg = build_config(args)
    res, model, images = jax_inference(cfg, args.batch_size, args.steps, args.warmup)
    peak = device_peak(args.dtype)
    tflops = res["flops_per_step"] / (res["ms_median"] / 1e3) / 1e12
    report = {
        "device": jax.devices()[0].device_kind,
        "mode": "inference",
        "config": {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "image_size": list(cfg.image_size),
                   "batch_size": args.batch_size, "dtype": args.dtype, "attention": args.attention},
        "jax": {**res, "tflops": tflops, "mfu": (tflops / peak) if peak else None},
        "peak_memory_gib": peak_memory_gib(),
    }
    print(f"device {report['device']}  EoMT d={cfg.embed_dim} L={cfg.depth} {cfg.image_size[0]}x{cfg.image_size[1]}"
          f"  batch {args.batch_size}  {args.dtype}  attention={args.attention}")
    print(jax_line(res, tflops, report["jax"]["mfu"]))
    if report["peak_memory_gib"] is not None:
        print(f"peak device memory {report['peak_memory_gib']:.2f} GiB")
    if args.compare_torch:
        t = torch_inference(model, images, args.steps, args.warmup, compile=not args.no_torch_compile)
        report["torch"] = t
        report["speedup"] = res["images_per_s"] / t["images_per_s"]
        print(torch_line(t, f"{t['dtype']}, torch.compile: {t['torch_compile']}"
                         + (f", max |jax - torch| {t['max_abs_diff']:.2e}" if "max_abs_diff" in t else "")))
        print(f"jax / torch throughput: {report['speedup']:.2f}x")
    print(json.dumps(report))
    return report


def train_main(args) -> dict[str, Any]:
    from eomt_jax import mesh as mesh_lib

    config = train_config(args)
    res, cfg, mesh, batch = jax_training(config, args.steps, args.warmup)
    dtype = "bfloat16" if cfg.dtype == "bfloat16" else "float32"
    peak = device_peak(dtype)
    tflops = res["flops_per_step"] / (res["ms_median"] / 1e3) / 1e12
    mfu = tflops / (peak * mesh.size) if peak else None
    b = config.data.batch_size
    report = {
        "device": jax.devices()[0].device_kind,
        "mode": "train",
        "config": {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "image_size": list(cfg.image_size),
                   "batch_size": b, "dtype": dtype, "attention": cfg.attention, "num_queries": cfg.num_queries,
                   "max_instances": config.data.max_instances, "num_points": config.loss.num_points,
                   "matcher": config.loss.matcher, "devices": mesh.size, "mesh": mesh_lib.describe(mesh)},
        "jax": {**res, "tflops": tflops, "mfu": mfu},
        "peak_memory_gib": peak_memory_gib(),
    }
    print(f"device {report['device']} x {mesh.size} ({mesh_lib.describe(mesh)})  EoMT train step d={cfg.embed_dim} "
          f"L={cfg.depth} {cfg.image_size[0]}x{cfg.image_size[1]}  global batch {b}  {dtype}  "
          f"attention={cfg.attention}  {config.data.max_instances} target slots, {config.loss.num_points} points, "
          f"matcher={config.loss.matcher}")
    print(jax_line(res, tflops, mfu) + f"  loss {res['loss']:.3f}")
    if report["peak_memory_gib"] is not None:
        print(f"peak device memory {report['peak_memory_gib']:.2f} GiB (device 0)")
    if res["compiled_memory_gib"] is not None:
        print(f"compiled step memory {res['compiled_memory_gib']:.2f} GiB per device (XLA estimate)")
    if args.compare_torch:
        t = torch_training(config, cfg, batch, args.steps, args.warmup, compile=not args.no_torch_compile)
        report["torch"] = t
        report["speedup"] = res["images_per_s"] / t["images_per_s"]
        print(torch_line(t, f"{t['device']}, torch.compile: {t['torch_compile']}, loss {t['loss']:.3f}"
                         + (f", peak memory {t['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in t else "")))
        print(f"jax / torch throughput: {report['speedup']:.2f}x")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
