"""`python -m eomt_jax.benchmark`: throughput of the network (and, with --compare-torch, of the PyTorch EoMT).

    python -m eomt_jax.benchmark --size L --image-size 640 --batch-size 1 --dtype float32 --steps 10 --compare-torch
    python -m eomt_jax.benchmark --config configs/coco_panoptic_large.py --dtype bfloat16 --batch-size 8

Prints images/s, ms per step (median and p90 over the timed steps, after warm-up, each step synchronised with
`block_until_ready`), compile time, peak device memory where the backend reports it, and the achieved TFLOP/s
and MFU from XLA's cost analysis against the device's peak. The PyTorch comparison runs the `transformers` EoMT
with the same shape and the same weights in the same process (`torch.compile` where it works), masked attention
off on both sides, as in every published evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
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


def torch_inference(model: EoMT, images: jax.Array, steps: int, warmup: int, compile: bool = True):
    """The transformers EoMT with our weights (converted back to its layout), timed on the same inputs."""
    import torch
    from transformers import EomtConfig, EomtForUniversalSegmentation

    c = model.config
    if c.image_size[0] != c.image_size[1]:
        raise ValueError("--compare-torch needs a square image size (the transformers EoMT is square only)")
    if c.mlp_type == "gelu" and c.mlp_hidden % c.embed_dim:
        raise ValueError("--compare-torch needs an MLP width that is a multiple of the embedding width")
    hf_cfg = EomtConfig(
        hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads, num_blocks=c.num_blocks,
        num_queries=c.num_queries, image_size=c.image_size[0], patch_size=c.patch_size,
        num_register_tokens=c.num_registers, num_labels=c.num_classes, num_upscale_blocks=c.num_upscale,
        use_swiglu_ffn=c.mlp_type == "swiglu", layer_norm_eps=c.layer_norm_eps,
        mlp_ratio=c.mlp_hidden // c.embed_dim if c.mlp_type == "gelu" else 4,
    )
    torch_model = EomtForUniversalSegmentation(hf_cfg).eval()
    if c.mlp_type == "gelu":  # same weights; the giant's SwiGLU widths differ between the two implementations
        torch_model.load_state_dict(to_hf_state_dict(model), strict=False)  # buffers keep their values
    torch_model.attn_mask_probs.zero_()  # no masks, no intermediate heads: the published evaluation setting
    x = np.asarray(images, np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    pixel = torch.from_numpy(((x - mean) / std).transpose(0, 3, 1, 2).copy())
    fn = torch_model
    compiled = False
    if compile:
        try:
            fn = torch.compile(torch_model)
            with torch.no_grad():
                fn(pixel_values=pixel)
            compiled = True
        except Exception as e:  # no compiler toolchain, unsupported op, ...
            print(f"torch.compile unavailable ({type(e).__name__}); timing eager PyTorch", file=sys.stderr)
            fn = torch_model

    def step():
        with torch.no_grad():
            return fn(pixel_values=pixel).masks_queries_logits

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    out = summary(times, x.shape[0])
    out["torch_compile"] = compiled
    if c.mlp_type == "gelu":
        # Same weights and inputs: the outputs must agree, or the comparison is not like for like.
        ours = np.asarray(model(images, masked_attn=False)[0][-1], np.float32)
        out["max_abs_diff"] = float(np.abs(step().numpy() - ours).max())
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m eomt_jax.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="config file[:arg]; its model section sets the architecture")
    p.add_argument("--size", default="L", choices=["S", "B", "L", "g"])
    p.add_argument("--image-size", type=int, default=0, help="square input size (default: the config's, or 640)")
    p.add_argument("--num-classes", type=int, default=133)
    p.add_argument("--num-queries", type=int, default=200)
    p.add_argument("--mode", default="inference", choices=["inference"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="plain", choices=["plain", "fused"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--no-torch-compile", action="store_true", help="time eager PyTorch only")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    cfg = build_config(args)
    res, model, images = jax_inference(cfg, args.batch_size, args.steps, args.warmup)
    peak = device_peak(args.dtype)
    tflops = res["flops_per_step"] / (res["ms_median"] / 1e3) / 1e12
    report = {
        "device": jax.devices()[0].device_kind,
        "config": {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "image_size": list(cfg.image_size),
                   "batch_size": args.batch_size, "dtype": args.dtype, "attention": args.attention},
        "jax": {**res, "tflops": tflops, "mfu": (tflops / peak) if peak else None},
        "peak_memory_gib": peak_memory_gib(),
    }
    print(f"device {report['device']}  EoMT d={cfg.embed_dim} L={cfg.depth} {cfg.image_size[0]}x{cfg.image_size[1]}"
          f"  batch {args.batch_size}  {args.dtype}  attention={args.attention}")
    print(f"jax     {res['images_per_s']:8.2f} img/s  median {res['ms_median']:8.1f} ms  p90 {res['ms_p90']:8.1f} ms"
          f"  compile {res['compile_s']:.1f} s  {tflops:.2f} TFLOP/s"
          + (f"  MFU {100 * tflops / peak:.1f}%" if peak else "  MFU n/a"))
    if report["peak_memory_gib"] is not None:
        print(f"peak device memory {report['peak_memory_gib']:.2f} GiB")
    if args.compare_torch:
        t = torch_inference(model, images, args.steps, args.warmup, compile=not args.no_torch_compile)
        report["torch"] = t
        report["speedup"] = res["images_per_s"] / t["images_per_s"]
        print(f"torch   {t['images_per_s']:8.2f} img/s  median {t['ms_median']:8.1f} ms  p90 {t['ms_p90']:8.1f} ms"
              f"  (torch.compile: {t['torch_compile']}"
              + (f", max |jax - torch| {t['max_abs_diff']:.2e}" if "max_abs_diff" in t else "") + ")")
        print(f"jax / torch throughput: {report['speedup']:.2f}x")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
