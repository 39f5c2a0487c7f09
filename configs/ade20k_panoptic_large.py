"""ADE20K panoptic: EoMT-L (DINOv2), panoptic segmentation.

Initialised, as published, from the COCO panoptic EoMT-L with a fresh class head:

    python convert/torch_to_flax.py --src coco_panoptic_eomt_large_640/pytorch_model.bin \
        --dst checkpoints/coco_panoptic_eomt_large_640
    python -m eomt_jax.main --config=configs/ade20k_panoptic_large.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/coco_panoptic_eomt_large_640 --config.load_class_head=False

At 1280, as published, from the COCO panoptic model of the same size:

    python convert/torch_to_flax.py --src coco_panoptic_eomt_large_1280/pytorch_model.bin \
        --dst checkpoints/coco_panoptic_eomt_large_1280
    python -m eomt_jax.main --config=configs/ade20k_panoptic_large.py:res=1280 --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/coco_panoptic_eomt_large_1280 --config.load_class_head=False

Variants: `configs/ade20k_panoptic_large.py:res=1280` (per-block remat on by default); `:runlocal` is a
2-step smoke run of a tiny model on generated data. Evaluate a converted published checkpoint:

    python -m eomt_jax.main --config=configs/ade20k_panoptic_large.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=CHECKPOINT

Expected (original model zoo): PQ 50.6 at 640, PQ 51.7 at 1280 (initialised from the COCO panoptic model).
Sized for: 4 x H100, batch 4 each; global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="panoptic",
        dataset="ade20k_panoptic",
        size="L",
        resolutions=(640, 1280),
        num_classes=150,
        num_queries=200,
        epochs=31,
        anneal_starts=(6520, 13040, 19560, 26080),
        anneal_ends=(13040, 19560, 26080, 32600),
    )
