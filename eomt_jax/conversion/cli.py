"""The converter's command line, run as `python convert/torch_to_flax.py --src ... --dst ...` (see that file).

`main(argv)` parses the flags, converts, prints `wrote DST: CONFIG` and the task and classes stored, and returns 0,
or prints `error: ...` and returns 1 when the source, the destination or the flags are unusable.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from typing import Any

from eomt_jax.config_lib import load_config_file
from eomt_jax.conversion import ConversionError, convert
from eomt_jax.conversion.reading import resolve_src
from eomt_jax.data.classes import DATASETS
from eomt_jax.inference.formats import TASKS
from eomt_jax.models.eomt import EoMTConfig
from eomt_jax.pretrained import read_metadata


def _model_overrides(config_spec: str | None, sets: list[str]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(EoMTConfig)}
    out: dict[str, Any] = {}
    if config_spec:
        cfg = load_config_file(config_spec)
        model = cfg.get("model") if hasattr(cfg, "get") else None
        if model is None:
            raise ValueError(f"{config_spec}: the config has no 'model' section")
        model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
        out.update({k: v for k, v in model.items() if k in known})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in known:
            raise ValueError(f"--set {key}: unknown model field; expected one of {sorted(known)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    # Runtime switches are not architecture: never let them make a cross-check fail.
    for k in ("masked_attn_enabled", "dtype", "param_dtype", "attention", "matmul_dtype"):
        out.pop(k, None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torch_to_flax.py",
        description="Convert PyTorch EoMT / DINOv2 / DINOv3 weights into an Orbax checkpoint.",
    )
    parser.add_argument("--src", required=True,
                        help="pytorch_model.bin, HF EoMT dir/file, DINOv2 or DINOv3 weights, or hub id")
    parser.add_argument("--base", help="the DINOv3 backbone a zoo *_dinov3 pytorch_model.bin is a delta against "
                                       "(HF dir, model.safetensors, Meta .pth, or hub id)")
    parser.add_argument("--dst", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--config", help="config file[:arg] whose `model` section overrides/cross-checks")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model field override")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--seed", type=int, default=0, help="init seed of a fresh head (backbone sources)")
    parser.add_argument("--dataset", choices=sorted(DATASETS),
                        help="store this dataset's class names with the weights (default: the dataset of a model-zoo "
                             "name in --src, e.g. coco_panoptic_eomt_large_640)")
    parser.add_argument("--task", choices=list(TASKS),
                        help="the task predictions default to (default: the dataset's, e.g. panoptic for "
                             "coco_panoptic)")
    args = parser.parse_args(argv)
    try:
        overrides = _model_overrides(args.config, args.set)
        base = resolve_src(args.base) if args.base else None
        out, config = convert(
            resolve_src(args.src), args.dst, base=base, overrides=overrides, dtype=args.dtype,
            overwrite=args.overwrite, seed=args.seed, task=args.task, dataset=args.dataset,
        )
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {config}")
    meta = read_metadata(out)
    print(f"task: {meta.get('task', 'not stored (pass --task to predict)')}; classes: "
          + (f"{meta['dataset']} ({len(meta['class_names'])} names)" if "class_names" in meta
             else "not named (pass --dataset to store names)"))
    return 0
