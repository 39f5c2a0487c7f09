"""`python -m eomt_jax`: check the installation and list the model-zoo architectures.

Prints the package and library versions, the JAX devices, and for every published EoMT architecture its
parameter count (computed abstractly, nothing is allocated), then runs one forward pass of a tiny random EoMT.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

import eomt_jax
from eomt_jax import caches
from eomt_jax.models import EoMT, EoMTConfig, preset

ZOO = [
    ("coco_panoptic S 640", "S", 133, 200, 640),
    ("coco_panoptic B 640", "B", 133, 200, 640),
    ("coco_panoptic L 640", "L", 133, 200, 640),
    ("coco_panoptic L 1280", "L", 133, 200, 1280),
    ("coco_panoptic g 640", "g", 133, 200, 640),
    ("coco_panoptic g 1280", "g", 133, 200, 1280),
    ("coco_instance L 640", "L", 80, 200, 640),
    ("ade20k_panoptic L 640", "L", 150, 200, 640),
    ("ade20k_semantic L 512", "L", 150, 100, 512),
    ("cityscapes_semantic L 1024", "L", 19, 100, 1024),
]


def num_params(config: EoMTConfig) -> int:
    abstract = nnx.eval_shape(lambda: EoMT(config, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def main() -> None:
    import flax
    import optax
    import orbax.checkpoint

    print(f"eomt_jax {eomt_jax.__version__} | jax {jax.__version__} | flax {flax.__version__} | "
          f"optax {optax.__version__} | orbax {orbax.checkpoint.__version__}")
    print(f"devices: {jax.devices()}")
    print(f"cache: {caches.cache_root()} (compiled programs in xla/, checkpoints converted from hub ids in "
          f"checkpoints/; {caches.SWITCH}=off keeps no compiled programs)")
    print(f"{'architecture':<28} {'params':>15}")
    for name, size, classes, queries, image in ZOO:
        cfg = preset(size, num_classes=classes, num_queries=queries, image_size=image)
        print(f"{name:<28} {num_params(cfg):>15,}")
    tiny = EoMTConfig(embed_dim=64, depth=4, num_heads=2, image_size=64, num_queries=10, num_classes=5,
                      num_blocks=2, mlp_hidden=256)
    model = EoMT(tiny, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    t = time.perf_counter()
    masks, classes = forward(state, np.zeros((2, 64, 64, 3), np.float32))
    jax.block_until_ready(masks)
    print(f"tiny EoMT forward: {len(masks)} predictions, mask logits {masks[-1].shape}, class logits "
          f"{classes[-1].shape} ({time.perf_counter() - t:.1f} s incl. compilation)")


if __name__ == "__main__":
    main()
