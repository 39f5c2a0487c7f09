"""`python -m eomt_jax.benchmark`: throughput of the network or of its training step (and, with --compare-torch,
of the PyTorch EoMT).

    python -m eomt_jax.benchmark --size L --image-size 640 --batch-size 1 --dtype float32 --steps 10 --compare-torch
    python -m eomt_jax.benchmark --config configs/coco_panoptic_large.py --dtype bfloat16 --batch-size 8
    python -m eomt_jax.benchmark --mode=train --config configs/coco_panoptic_large.py --batch-size 16 --compare-torch
    python -m eomt_jax.benchmark --suite gpu --out DIR      # everything below, JSON + Markdown (see SUITE)
    python -m eomt_jax.benchmark --suite startup --out DIR  # `predict` on one photo: first and second run

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

--suite gpu runs a fixed set of both modes and of the PyTorch comparisons within 8 minutes on one GPU (`SUITE`).
--suite startup times `python -m eomt_jax.predict` on one photo from launch to exit, with an empty compilation cache
and again with the one the first run filled (`eomt_jax.startup_timing`).

With --compare-torch (and --suite gpu), JAX does not preallocate device memory (XLA_PYTHON_CLIENT_PREALLOCATE=false
unless set), so that PyTorch, which runs second in the same process, gets what JAX's pool has not taken: compare at
a batch that fits twice.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from eomt_jax import config_lib, startup_timing, timing, torch_reference
from eomt_jax import mesh as mesh_lib
from eomt_jax.models.eomt import PRECISIONS, EoMTConfig, preset


def build_config(args) -> EoMTConfig:
    if args.config:
        cfg = config_lib.model_config(config_lib.load_config_file(args.config))
        if args.image_size:
            cfg = cfg.replace(image_size=args.image_size)
    else:
        cfg = preset(args.size, num_classes=args.num_classes, num_queries=args.num_queries,
                     image_size=args.image_size or 640)
    return cfg.with_precision(args.dtype).replace(param_dtype="bfloat16" if args.dtype == "bfloat16" else "float32",
                       attention=args.attention, masked_attn_enabled=False)


def train_config(args) -> ml_collections.ConfigDict:
    """The experiment of --mode=train: the --config file, or the COCO panoptic experiment of --size; with the
    command line's image size, global batch, compute dtype and attention where given."""
    if args.config:
        config = config_lib.load_config_file(args.config)
    else:
        # The 12-epoch COCO schedule of configs/coco_panoptic_*.py, one phase per masked block; where the phases
        # lie does not change the cost of a step.
        k = preset(args.size, num_classes=args.num_classes, num_queries=args.num_queries, image_size=640).num_blocks
        per_epoch = config_lib.STEPS_PER_EPOCH["coco_panoptic"]
        starts = tuple(round(per_epoch * (2 + 6 * j / max(k - 1, 1))) for j in range(k))
        size = args.image_size or 640
        config = config_lib.experiment(
            f"res={size}", task="panoptic", dataset="coco_panoptic", size=args.size, resolutions=(size,),
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


def jax_line(res: dict[str, Any], tflops: float, mfu: float | None) -> str:
    return (f"jax     {res['images_per_s']:8.2f} img/s  median {res['ms_median']:8.1f} ms  p90 {res['ms_p90']:8.1f} ms"
            f"  compile {res['compile_s']:.1f} s  {tflops:.2f} TFLOP/s"
            + (f"  MFU {100 * mfu:.1f}%" if mfu else "  MFU n/a"))


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
    p.add_argument("--dtype", choices=sorted(PRECISIONS),
                   help="precision policy (default: float32; --mode=train: the config's)")
    p.add_argument("--attention", choices=["plain", "fused"], help="(default: plain; --mode=train: the config's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--no-torch-compile", action="store_true", help="time eager PyTorch only")
    p.add_argument("--suite", choices=["gpu", "startup"],
                   help="gpu: a whole benchmark suite (see SUITE) and its report; startup: the time to the first "
                        "result of `predict` on one photo, empty and filled compilation cache (startup_timing.py)")
    p.add_argument("--startup-sizes", default="S,L", help="--suite startup: the models timed (default: S,L)")
    p.add_argument("--out", help="--suite: the folder for the report (gpu: suite.json, suite.md, the profiler trace; "
                                 "startup: startup.json, startup.md, the checkpoints)")
    p.add_argument("--tiny", action="store_true", help="--suite: the same code path at tiny sizes (any device)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="--suite: parts that would end later than this many seconds after the start are skipped "
                        "(and named as skipped)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.suite:
        if not args.out:
            p.error("--suite needs --out DIR")
        if args.suite == "startup":
            sizes = tuple(args.startup_sizes.split(","))
            if not set(sizes) <= {"S", "B", "L", "g"}:
                p.error(f"--startup-sizes: expected sizes among S, B, L, g, got {args.startup_sizes!r}")
            report = startup_timing.run(args.out, sizes=sizes, image_size=args.image_size or 640,
                                        tiny=args.tiny, photo_hw=(48, 64) if args.tiny else (480, 640))
            print(startup_timing.markdown(report))
            return report
        # PyTorch runs in the same process after JAX: JAX must not take the device memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        return suite_main(args)
    if args.compare_torch:
        # Takes effect only if the JAX backend has not started yet (it has not, when run from the command line).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.mode == "train":
        return train_main(args)
    args.batch_size = args.batch_size or 1
    args.dtype = args.dtype or "float32"
    args.attention = args.attention or "plain"
    cfg = build_config(args)
    res, model, images = timing.jax_inference(cfg, args.batch_size, args.steps, args.warmup)
    peak = timing.device_peak("float32" if args.dtype == "float32" else "bfloat16")
    tflops = res["flops_per_step"] / (res["ms_median"] / 1e3) / 1e12
    report = {
        "device": jax.devices()[0].device_kind,
        "mode": "inference",
        "config": {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "image_size": list(cfg.image_size),
                   "batch_size": args.batch_size, "dtype": args.dtype, "attention": args.attention},
        "jax": {**res, "tflops": tflops, "mfu": (tflops / peak) if peak else None},
        "peak_memory_gib": timing.peak_memory_gib(),
    }
    print(f"device {report['device']}  EoMT d={cfg.embed_dim} L={cfg.depth} {cfg.image_size[0]}x{cfg.image_size[1]}"
          f"  batch {args.batch_size}  {args.dtype}  attention={args.attention}")
    print(jax_line(res, tflops, report["jax"]["mfu"]))
    if report["peak_memory_gib"] is not None:
        print(f"peak device memory {report['peak_memory_gib']:.2f} GiB")
    if args.compare_torch:
        t = torch_reference.torch_inference(model, images, args.steps, args.warmup,
                                            compile=not args.no_torch_compile)
        _add_torch(report, t, f"{t['dtype']}, torch.compile: {t['torch_compile']}"
                   + (f", max |jax - torch| {t['max_abs_diff']:.2e}" if "max_abs_diff" in t else ""))
    print(json.dumps(report))
    return report


def train_main(args) -> dict[str, Any]:
    config = train_config(args)
    res, cfg, mesh, batch = timing.jax_training(config, args.steps, args.warmup)
    dtype = cfg.precision
    peak = timing.device_peak("float32" if dtype == "float32" else "bfloat16")
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
        "peak_memory_gib": timing.peak_memory_gib(),
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
        t = torch_reference.torch_training(config, cfg, batch, args.steps, args.warmup,
                                           compile=not args.no_torch_compile)
        _add_torch(report, t, f"{t['device']}, torch.compile: {t['torch_compile']}, loss {t['loss']:.3f}"
                   + (f", peak memory {t['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in t else ""))
    print(json.dumps(report))
    return report


def _add_torch(report: dict[str, Any], t: dict[str, Any], details: str) -> None:
    """Record and print the PyTorch side of a comparison and the throughput ratio."""
    report["torch"] = t
    report["speedup"] = report["jax"]["images_per_s"] / t["images_per_s"]
    print(torch_line(t, details))
    print(f"jax / torch throughput: {report['speedup']:.2f}x")


# -- the GPU suite -------------------------------------------------------------------------------------------------

SUITE = """--suite gpu: EoMT-L 640 on one accelerator, in this order, each part skipped (and named) when it would end
after --budget-s (7 minutes: the suite fits in 8 from a cold start): inference in bf16 at batch 1 and 8, plain and
fused attention, the network alone and with the panoptic post-processing; the train step of
configs/coco_panoptic_large.py at 4 images per device with its own precision policy, plain and fused attention,
with MFU, and a jax.profiler trace of 3 steps with the operations that took the most time; the transformers EoMT
(torch.compile where it works) on the same inputs: inference and its training step. Writes suite.json, suite.md
(tables for the README) and trace/ into --out. --tiny runs the same parts at tiny sizes, inference at one batch
size (any device, CPUs included; PyTorch eager)."""

# Tiny sizes of --suite --tiny: every part of the suite, in seconds on a CPU.
TINY_MODEL = dict(embed_dim=64, depth=3, num_heads=2, mlp_hidden=128, num_blocks=2, num_queries=5,
                  num_classes=133, image_size=(64, 64))


def suite_main(args) -> dict[str, Any]:
    """`--suite gpu`: run the suite (`SUITE`), write DIR/suite.json and DIR/suite.md, return the report."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    tiny = args.tiny
    report: dict[str, Any] = {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax_version": jax.__version__,
        "tiny": tiny, "inference": [], "train": [], "skipped": [],
    }

    def part(name: str, fn, needs_s: float) -> None:
        """Run one part unless it would end after the budget (`needs_s`: what it takes on an H100 from a cold
        compile, roughly; --tiny: nothing); a part that fails is recorded and the suite goes on."""
        if time.monotonic() - start + (0 if tiny else needs_s) > args.budget_s:
            report["skipped"].append(name)
            print(f"[suite] skipped (time budget): {name}", flush=True)
            return
        t = time.monotonic()
        try:
            fn()
        except Exception as e:  # one broken part (an OOM, a torch.compile failure) must not lose the others
            report.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"[suite] {name} failed: {report['errors'][name]}", flush=True)
        print(f"[suite] {name}: {time.monotonic() - t:.0f} s", flush=True)

    steps, warmup = (2, 1) if tiny else (args.steps, args.warmup)
    # torch.compile of even a tiny model takes minutes on a CPU: --tiny times eager PyTorch.
    torch_compile = not (args.no_torch_compile or tiny)
    batches = (2,) if tiny else (1, 8)  # --tiny: one batch size runs the same code as two
    models = {}

    def jax_inference(batch, attention):
        cfg = _suite_model(tiny, attention)
        res, model, images = timing.jax_inference(cfg, batch, steps, warmup, postprocess=True)
        models[batch] = (model, images)
        report["inference"].append({"framework": "jax", "attention": attention, "batch": batch, **res,
                                    "peak_memory_gib": timing.peak_memory_gib()})

    for batch in batches:
        for attention in ("plain", "fused"):
            part(f"jax inference batch {batch} {attention}", functools.partial(jax_inference, batch, attention), 30)

    train_config = _suite_train_config(tiny)
    # Fused first: JAX's peak memory only grows within a process, so the second (plain, larger) step's peak is
    # still its own.
    for attention in ("fused", "plain"):
        def jax_train(attention=attention):
            config = train_config.copy_and_resolve_references()
            config.model.attention = attention
            trace = out / "trace" if attention == "fused" else None
            res, cfg, mesh, batch = timing.jax_training(config, steps, warmup, trace_dir=trace)
            peak = timing.device_peak("float32" if cfg.precision == "float32" else "bfloat16")
            tflops = res["flops_per_step"] / (res["ms_median"] / 1e3) / 1e12
            report["train"].append({
                "framework": "jax", "attention": attention, "precision": cfg.precision, "devices": mesh.size,
                "images_per_device": config.data.batch_size // mesh.size, **res, "tflops": tflops,
                "mfu": tflops / (peak * mesh.size) if peak else None, "peak_memory_gib": timing.peak_memory_gib()})
            models["train"] = (config, cfg, batch)

        part(f"jax train step {attention}", jax_train, 120)

    for batch in batches:
        def torch_inference(batch=batch):
            model, images = models[batch]
            res = torch_reference.torch_inference(model, images, steps, warmup, compile=torch_compile,
                                                  postprocess=True)
            report["inference"].append({"framework": "torch", "attention": "transformers", "batch": batch, **res})

        part(f"torch inference batch {batch}", torch_inference, 60)

    def torch_train():
        config, cfg, batch = models["train"]
        res = torch_reference.torch_training(config, cfg, batch, steps, warmup, compile=torch_compile)
        report["train"].append({"framework": "torch", "attention": "transformers", "precision": cfg.precision,
                                "devices": 1, "images_per_device": int(batch["image"].shape[0]), **res})

    part("torch train step", torch_train, 90)
    report["seconds"] = time.monotonic() - start
    (out / "suite.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "suite.md").write_text(suite_markdown(report))
    print((out / "suite.md").read_text())
    return report


def _suite_model(tiny: bool, attention: str) -> EoMTConfig:
    cfg = EoMTConfig(**TINY_MODEL) if tiny else preset("L", num_classes=133, num_queries=200, image_size=640)
    return cfg.with_precision("bfloat16").replace(param_dtype="bfloat16", attention=attention,
                                                  masked_attn_enabled=False)


def _suite_train_config(tiny: bool) -> ml_collections.ConfigDict:
    spec = str(Path(__file__).resolve().parents[1] / "configs" / "coco_panoptic_large.py")
    config = config_lib.load_config_file(spec + (":runlocal" if tiny else ""))
    with config.unlocked():
        config.data.batch_size = 4 * jax.device_count()  # the paper's 4 images per GPU
        config.mesh = (("data", -1), ("fsdp", 1))
    return config


def suite_markdown(report: dict[str, Any]) -> str:
    """The suite's report as Markdown tables (inference, train step, top operations)."""
    torch_rate = {(r["batch"], k): r[k]["images_per_s"] if k != "net" else r["images_per_s"]
                  for r in report["inference"] if r["framework"] == "torch"
                  for k in ("net", "with_postprocess") if k == "net" or k in r}
    size = "tiny EoMT, 64x64" if report["tiny"] else "EoMT-L 640"
    lines = [f"{report['device']} ({report['devices']} device(s)), jax {report['jax_version']}; {size}, bf16 weights "
             "and activations, masked attention off.", "",
             "| framework, attention | batch | network ms | img/s | + post-processing ms | img/s | compile s | "
             "img/s vs PyTorch (network, + post) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["inference"]:
        post = r.get("with_postprocess", {})
        ratio = ""
        if r["framework"] == "jax" and (r["batch"], "net") in torch_rate:
            ratio = f"{r['images_per_s'] / torch_rate[(r['batch'], 'net')]:.2f}x"
            if post and (r["batch"], "with_postprocess") in torch_rate:
                ratio += f", {post['images_per_s'] / torch_rate[(r['batch'], 'with_postprocess')]:.2f}x"
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ("torch.compile" if r.get("torch_compile")
                                                                         else "eager")
        lines.append(f"| {r['framework']}, {r['attention']} | {r['batch']} | {r['ms_median']:.2f} | "
                     f"{r['images_per_s']:.1f} | {post.get('ms_median', float('nan')):.2f} | "
                     f"{post.get('images_per_s', float('nan')):.1f} | {compile_s} | {ratio} |")
    lines += ["", "Train step (configs/coco_panoptic_large.py" + (":runlocal" if report["tiny"] else "") + "):", "",
              "| framework, attention | precision | images/device | ms/step | img/s | MFU | peak memory GiB "
              "(compiled step) | compile s |", "|---|---|---|---|---|---|---|---|"]
    for r in report["train"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        peak = f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") else "n/a"
        if r.get("compiled_memory_gib"):
            peak += f" ({r['compiled_memory_gib']:.2f})"
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ("torch.compile" if r.get("torch_compile")
                                                                         else "eager")
        lines.append(f"| {r['framework']}, {r['attention']} | {r['precision']} | {r['images_per_device']} | "
                     f"{r['ms_median']:.1f} | {r['images_per_s']:.2f} | {mfu} | {peak} | {compile_s} |")
    ops = next((r["top_ops"] for r in report["train"] if r.get("top_ops")), [])
    if ops:
        lines += ["", "Most expensive operations of the train step (jax.profiler, fused attention):", "",
                  "| operation | calls | ms | % |", "|---|---|---|---|"]
        lines += [f"| `{o['name']}` {o['detail']} | {o['count']} | {o['total_ms']:.2f} | {o['percent']:.1f} |"
                  for o in ops]
    for name in report["skipped"]:
        lines.append(f"\nSkipped (time budget): {name}")
    for name, error in report.get("errors", {}).items():
        lines.append(f"\nFailed: {name}: {error}")
    return "\n".join(lines) + "\n"


def run() -> None:
    """The `eomt-benchmark` command (the report is printed; `main` also returns it)."""
    main()


if __name__ == "__main__":
    run()
