"""ADE20K semantic: EoMT-L (DINOv2), semantic segmentation.

Initialised from DINOv2 (vit_large_patch14_reg4_dinov2.lvd142m), converted once:

    python convert/torch_to_flax.py --src timm/vit_large_patch14_reg4_dinov2.lvd142m \
        --dst checkpoints/dinov2_large_ade20k_semantic_512 --config configs/ade20k_semantic_large.py
    python -m eomt_jax.main --config=configs/ade20k_semantic_large.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov2_large_ade20k_semantic_512

Variant: `configs/ade20k_semantic_large.py:runlocal` is a 2-step smoke run of a tiny model on generated
data. Evaluate a converted published checkpoint:

    python -m eomt_jax.main --config=configs/ade20k_semantic_large.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=CHECKPOINT

Expected (original model zoo): mIoU 58.4.
Sized for: 4 x H100, batch 4 each; global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="semantic",
        dataset="ade20k_semantic",
        size="L",
        resolutions=(512,),
        num_classes=150,
        num_queries=100,
        epochs=31,
        anneal_starts=(6520, 13040, 19560, 26080),
        anneal_ends=(13040, 19560, 26080, 32600),
    )
