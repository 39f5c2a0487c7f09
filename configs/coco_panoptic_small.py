"""COCO panoptic: EoMT-S (DINOv2), panoptic segmentation.

Initialised from DINOv2 (vit_small_patch14_reg4_dinov2.lvd142m), converted once:

    python convert/torch_to_flax.py --src timm/vit_small_patch14_reg4_dinov2.lvd142m \
        --dst checkpoints/dinov2_small_coco_panoptic_640 --config configs/coco_panoptic_small.py
    python -m eomt_jax.main --config=configs/coco_panoptic_small.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov2_small_coco_panoptic_640

Variants: `configs/coco_panoptic_small.py:sched=1x`; `:runlocal` is a 2-step smoke run of a tiny model on
generated data. Evaluate a converted published checkpoint:

    python -m eomt_jax.main --config=configs/coco_panoptic_small.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=CHECKPOINT

Expected (original model zoo): PQ 46.7 (2x schedule, the published weights); 1x: PQ 44.7.
Sized for: 1 GPU with >= 24 GB; global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="panoptic",
        dataset="coco_panoptic",
        size="S",
        resolutions=(640,),
        num_classes=133,
        num_queries=200,
        schedules={
            "2x": dict(epochs=24, anneal_starts=(29564, 73910, 118256), anneal_ends=(59128, 103474, 147820)),
            "1x": dict(epochs=12, anneal_starts=(14782, 36955, 59128), anneal_ends=(29564, 51737, 73910)),
        },
    )
