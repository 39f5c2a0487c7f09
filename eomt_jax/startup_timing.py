"""Start-up time of prediction (`python -m eomt_jax.benchmark --suite startup --out DIR`): wall seconds from
launching `python -m eomt_jax.predict` on one photo to its exit, first with an empty compilation cache, then again
with the cache the first run filled. Interpreter start, imports, checkpoint loading, compilation or cache reads,
the forward pass, post-processing and writing the outputs are all counted: what a user waits for.

The checkpoints are the model-zoo COCO panoptic architectures (133 classes, 200 queries) with random weights
(the time does not depend on the values), written into DIR; the photo is a generated 640×480 JPEG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from PIL import Image

from eomt_jax import pretrained
from eomt_jax.data.classes import dataset_classes
from eomt_jax.models.eomt import EoMT, EoMTConfig, preset


def _checkpoint(out: Path, size: str, image_size: int, tiny: bool) -> Path:
    path = out / f"coco_panoptic_eomt_{size}_{image_size}_random"
    if (path / pretrained.CONFIG_FILE).exists():
        return path
    if tiny:
        config = EoMTConfig(embed_dim=64, depth=2, num_heads=2, image_size=image_size, num_queries=8,
                            num_classes=133, num_blocks=1, mlp_hidden=128)
    else:
        config = preset(size, num_classes=133, num_queries=200, image_size=image_size)
    names, stuff = dataset_classes("coco_panoptic")
    meta = {"source": "random weights (start-up timing)", "task": "panoptic", "dataset": "coco_panoptic",
            "class_names": names, "stuff_classes": stuff}
    return pretrained.write_network(path, EoMT(config, rngs=nnx.Rngs(0)), metadata=meta, overwrite=True)


def _photo(path: Path, hw: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    rgb = np.stack([(xx * 0.4) % 255, (yy * 0.5) % 255, ((xx + yy) * 0.3) % 255], -1) + rng.normal(0, 20, (*hw, 3))
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def run(out: str | os.PathLike, sizes=("S", "L"), image_size: int = 640, photo_hw=(480, 640),
        tiny: bool = False) -> dict[str, Any]:
    """Time `predict` twice per size (see the module docstring); writes DIR/startup.json and DIR/startup.md."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    photo = _photo(out / "photo.jpg", photo_hw)
    rows = []
    for size in sizes:
        ckpt = _checkpoint(out, size, image_size, tiny)
        cache = out / f"cache_{size}"
        shutil.rmtree(cache, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
        env.update(EOMT_JAX_CACHE=str(cache))
        env.pop("EOMT_JAX_COMPILATION_CACHE", None)
        row: dict[str, Any] = {"model": f"EoMT-{size}", "image_size": image_size, "photo": list(photo_hw)}
        for run_name in ("first", "second"):
            dst = out / f"predictions_{size}_{run_name}"
            shutil.rmtree(dst, ignore_errors=True)
            start = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "eomt_jax.predict", "--checkpoint", str(ckpt),
                                   "--input", str(photo), "--output", str(dst)], env=env, capture_output=True,
                                  text=True)
            row[f"{run_name}_s"] = round(time.monotonic() - start, 2)
            if done.returncode != 0:
                raise RuntimeError(f"predict failed ({run_name} run, EoMT-{size}):\n{done.stderr[-2000:]}")
        row["cached_programs"] = len(list((cache / "xla").iterdir()))
        print(f"[startup] EoMT-{size} {image_size}: first run {row['first_s']:.1f} s, second run "
              f"{row['second_s']:.1f} s", flush=True)
        rows.append(row)
    report = {"device": str(_device_kind()), "rows": rows}
    (out / "startup.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "startup.md").write_text(markdown(report))
    return report


def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | input | photo | first run (empty cache) | second run | programs cached |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        h, w = r["photo"]
        lines.append(f"| {r['model']} | {r['image_size']} | {w}×{h} | {r['first_s']:.1f} s | {r['second_s']:.1f} s "
                     f"| {r['cached_programs']} |")
    return "\n".join(lines) + "\n"
