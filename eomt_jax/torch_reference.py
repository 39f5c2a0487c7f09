"""The `transformers` PyTorch EoMT as the reference to time against: same architecture, same weights (converted
back to its layout), same inputs; its own training step (loss, Hungarian matcher, AdamW, clipping).

Used by `python -m eomt_jax.benchmark --compare-torch`; needs torch and transformers.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from eomt_jax.conversion.torch_layout import to_hf_state_dict
from eomt_jax.models.eomt import EoMT, EoMTConfig
from eomt_jax.timing import summary

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
    """`timing.timed` for PyTorch: each step waits for the device."""
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


def torch_inference(model: EoMT, images: jax.Array, steps: int, warmup: int, compile: bool = True,
                    postprocess: bool = False):
    """The transformers EoMT with our weights (converted back to its layout), timed on the same inputs.

    With `postprocess`, also the network followed by the transformers image processor's panoptic
    post-processing at the input's resolution (`post_process_panoptic_segmentation`, COCO's stuff classes for
    133 classes), reported under "with_postprocess"."""
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
    bf16 = c.precision != "float32"

    def outputs(f):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return f(pixel_values=pixel)

    def run(f):
        return outputs(f).masks_queries_logits

    fn, compiled = torch_compiled(torch_model, run, compile)

    def step():
        return run(fn)

    out = summary(torch_timed(step, steps, warmup, device), pixel.shape[0])
    out["torch_compile"] = compiled
    if postprocess:
        out["with_postprocess"] = summary(torch_timed(_panoptic_step(outputs, fn, c), steps, warmup, device),
                                          pixel.shape[0])
    if c.mlp_type == "gelu":
        # Same weights and inputs: the outputs must agree, or the comparison is not like for like.
        ours = np.asarray(model(images, masked_attn=False)[0][-1], np.float32)
        out["max_abs_diff"] = float(np.abs(step().float().cpu().numpy() - ours).max())
    out["dtype"] = "bfloat16 (autocast)" if bf16 else "float32"
    return out


def _panoptic_step(run_outputs: Callable, fn, c: EoMTConfig) -> Callable[[], Any]:
    """One step of network + the transformers panoptic post-processing (`run_outputs(fn)` -> model outputs)."""
    import torch
    from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

    h, w = c.image_size
    processor = EomtImageProcessorPil(size={"shortest_edge": h, "longest_edge": w})
    stuff = list(range(80, c.num_classes)) if c.num_classes == 133 else None

    def step():
        outputs = run_outputs(fn)
        with torch.no_grad():
            return processor.post_process_panoptic_segmentation(
                outputs, target_sizes=[(h, w)] * outputs.masks_queries_logits.shape[0], stuff_classes=stuff)

    return step


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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision != "float32")

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
