"""COCO panoptic: EoMT-L (DINOv2), panoptic segmentation.

Initialised from DINOv2 (vit_large_patch14_reg4_dinov2.lvd142m), converted once per image size (the
conversion resamples DINOv2's 37 x 37 position grid straight to the run's grid, as timm does):

    python convert/torch_to_flax.py --src timm/vit_large_patch14_reg4_dinov2.lvd142m \
        --dst checkpoints/dinov2_large_coco_panoptic_640 --config configs/coco_panoptic_large.py
    python -m eomt_jax.main --config=configs/coco_panoptic_large.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov2_large_coco_panoptic_640

At 1280:

    python convert/torch_to_flax.py --src timm/vit_large_patch14_reg4_dinov2.lvd142m \
        --dst checkpoints/dinov2_large_coco_panoptic_1280 --config configs/coco_panoptic_large.py:res=1280
    python -m eomt_jax.main --config=configs/coco_panoptic_large.py:res=1280 --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov2_large_coco_panoptic_1280

Variants: `configs/coco_panoptic_large.py:res=1280` (per-block remat on by default); `:runlocal` is a
2-step smoke run of a tiny model on generated data. Evaluate a converted published checkpoint:

    python -m eomt_jax.main --config=configs/coco_panoptic_large.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=CHECKPOINT

Expected (original model zoo): PQ 56.0 at 640, PQ 58.3 at 1280.
Sized for: 4 x H100, batch 4 each (the original trains 640 in ~6 h at ~26 GB per GPU); global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="panoptic",
        dataset="coco_panoptic",
        size="L",
        resolutions=(640, 1280),
        num_classes=133,
        num_queries=200,
        epochs=12,
        anneal_starts=(14782, 29564, 44346, 59128),
        anneal_ends=(29564, 44346, 59128, 73910),
    )
