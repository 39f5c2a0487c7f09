"""Cityscapes semantic: EoMT-L (DINOv2), semantic segmentation.

Initialised from DINOv2 (vit_large_patch14_reg4_dinov2.lvd142m), converted once:

    python convert/torch_to_flax.py --src timm/vit_large_patch14_reg4_dinov2.lvd142m \
        --dst checkpoints/dinov2_large_cityscapes_semantic_1024 --config configs/cityscapes_semantic_large.py
    python -m eomt_jax.main --config=configs/cityscapes_semantic_large.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov2_large_cityscapes_semantic_1024

Variant: `configs/cityscapes_semantic_large.py:runlocal` is a 2-step smoke run of a tiny model on generated
data. Evaluate a converted published checkpoint:

    python -m eomt_jax.main --config=configs/cityscapes_semantic_large.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=CHECKPOINT

Expected (original model zoo): mIoU 84.2.
Sized for: 4 x H100, batch 4 each; global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="semantic",
        dataset="cityscapes_semantic",
        size="L",
        resolutions=(1024,),
        num_classes=19,
        num_queries=100,
        epochs=107,
        anneal_starts=(3317, 6634, 9951, 13268),
        anneal_ends=(6634, 9951, 13268, 16585),
    )
