"""`python -m eomt_jax.export`: serialise the inference network with `jax.export` (StableHLO) for serving.

    python -m eomt_jax.export --checkpoint out/ --image-size 640 --out eomt_l_640.jaxexport [--platforms cpu,cuda]

The exported function takes float32 images (batch, S, S, 3) in [0, 1] with a symbolic batch dimension and returns
the final (mask_logits, class_logits); the weights are embedded, so serving needs no Python model code:

    from jax import export
    exported = export.deserialize(open("eomt_l_640.jaxexport", "rb").read())
    mask_logits, class_logits = exported.call(images)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax import export

from eomt_jax import pretrained
from eomt_jax.atomic import write_file
from eomt_jax.models.eomt import PRECISIONS, EoMT


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_model(model: EoMT, image_size: int | tuple[int, int], *, symbolic_batch: bool = True,
                 platforms: tuple[str, ...] | None = None) -> export.Exported:
    """`platforms`: the backends the file will run on (default: this machine's); one file can serve several, each
    with its own code paths (the CPU inference loops on "cpu", the whole-array program elsewhere)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    graphdef, state = nnx.split(model)

    def forward(images):
        mask_logits, class_logits = nnx.merge(graphdef, state)(images, masked_attn=False)
        return mask_logits[-1], class_logits[-1]

    batch = export.symbolic_shape("batch")[0] if symbolic_batch else 1
    return export.export(jax.jit(forward), platforms=platforms)(jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32))


def parse_platforms(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in PLATFORMS]
    if unknown or not names:
        raise ValueError(f"--platforms takes a comma-separated list of {', '.join(PLATFORMS)}; got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eomt_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted checkpoint directory")
    p.add_argument("--image-size", type=int, default=0, help="square input size (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--dtype", default=None, choices=sorted(PRECISIONS),
                   help="precision policy (default: the checkpoint's, float32)")
    p.add_argument("--platforms", help="comma-separated backends the file must run on, e.g. cpu,cuda,tpu (default: "
                                       "this machine's); no accelerator is needed to export for one")
    p.add_argument("--fixed-batch", action="store_true", help="export for batch 1 instead of a symbolic batch")
    args = p.parse_args(argv)
    try:
        platforms = parse_platforms(args.platforms)
    except ValueError as e:
        p.error(str(e))
    model = pretrained.load(args.checkpoint, dtype=args.dtype)
    size = args.image_size or model.config.image_size
    exported = export_model(model, size, symbolic_batch=not args.fixed_batch, platforms=platforms)
    write_file(Path(args.out), exported.serialize())
    print(f"wrote {args.out} for {', '.join(exported.platforms)}: input {exported.in_avals[0]}, "
          f"outputs {[str(a) for a in exported.out_avals]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
