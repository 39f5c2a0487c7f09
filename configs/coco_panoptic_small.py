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
    a = config_lib.parse_arg(arg, res=640, runlocal=False, sched="2x")
    if a.res not in (640,):
        raise ValueError(f"res must be one of (640,), got {a.res}")
    if a.sched not in ("1x", "2x"):
        raise ValueError(f"sched must be 1x or 2x, got {a.sched}")
    c = config_lib.experiment(
        task="panoptic",
        dataset="coco_panoptic",
        size="S",
        image_size=a.res,
        num_classes=133,
        num_queries=200,
        epochs=24 if a.sched == '2x' else 12,
        anneal_starts=(29564, 73910, 118256) if a.sched == '2x' else (14782, 36955, 59128),
        anneal_ends=(59128, 103474, 147820) if a.sched == '2x' else (29564, 51737, 73910),
        eval_every_epochs=1,
    )
    if a.runlocal:
        c = config_lib.runlocal(c, "coco_panoptic")
    return c
