"""COCO panoptic: EoMT-B (DINOv2), panoptic segmentation.

Initialised from DINOv2 (vit_base_patch14_reg4_dinov2.lvd142m), converted once:

    python convert/torch_to_flax.py --src timm/vit_base_patch14_reg4_dinov2.lvd142m \
        --dst checkpoints/dinov2_base_coco_panoptic_640 --config configs/coco_panoptic_base.py
    python -m eomt_jax.main --config=configs/coco_panoptic_base.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov2_base_coco_panoptic_640

Variants: `configs/coco_panoptic_base.py:sched=1x`; `:runlocal` is a 2-step smoke run of a tiny model on
generated data. Evaluate a converted published checkpoint:

    python -m eomt_jax.main --config=configs/coco_panoptic_base.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=CHECKPOINT

Expected (original model zoo): PQ 51.6 (2x schedule, the published weights); 1x: PQ 50.6.
Sized for: 4 GPUs x batch 4; global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="panoptic",
        dataset="coco_panoptic",
        size="B",
        resolutions=(640,),
        num_classes=133,
        num_queries=200,
        schedules={
            "2x": dict(epochs=24, anneal_starts=(29564, 73910, 118256), anneal_ends=(59128, 103474, 147820)),
            "1x": dict(epochs=12, anneal_starts=(14782, 36955, 59128), anneal_ends=(29564, 51737, 73910)),
        },
    )
