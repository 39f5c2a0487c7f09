"""COCO instance: EoMT-L (DINOv3), instance segmentation.

The original's `configs/dinov3/coco/instance/eomt_large_640.yaml` and `eomt_large_1280.yaml` (`:res=1280`).
Against the DINOv2 setting (`coco_instance_large.py`): lr 2e-4, warm-up (2000, 3000) steps and the K query blocks
trained without layer-wise decay (`llrd_l2_enabled=False`); the annealing milestones are the DINOv2 ones. The
original's 1280 file sets no image size of its own (its data default is 640); the model zoo lists that model at
1280, the size `:res=1280` trains and validates at.

Validate the published models. Their files store the difference to the DINOv3 backbone, so the conversion reads
the backbone too; that one is gated: accept its licence on huggingface.co/facebook/dinov3-vitl16-pretrain-lvd1689m,
then `huggingface-cli login`.

    huggingface-cli download facebook/dinov3-vitl16-pretrain-lvd1689m --local-dir dinov3-vitl16
    huggingface-cli download tue-mps/coco_instance_eomt_large_640_dinov3 pytorch_model.bin \
        --local-dir coco_instance_eomt_large_640_dinov3
    python convert/torch_to_flax.py --src coco_instance_eomt_large_640_dinov3/pytorch_model.bin \
        --base dinov3-vitl16 --dst checkpoints/coco_instance_eomt_large_640_dinov3 \
        --config configs/dinov3_coco_instance_large.py
    python -m eomt_jax.main --config=configs/dinov3_coco_instance_large.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=checkpoints/coco_instance_eomt_large_640_dinov3

At 1280 (`tue-mps/coco_instance_eomt_large_1280_dinov3`, same base): the weights do not tell the image size, the
config does:

    python convert/torch_to_flax.py --src coco_instance_eomt_large_1280_dinov3/pytorch_model.bin \
        --base dinov3-vitl16 --dst checkpoints/coco_instance_eomt_large_1280_dinov3 \
        --config configs/dinov3_coco_instance_large.py:res=1280
    python -m eomt_jax.main --config=configs/dinov3_coco_instance_large.py:res=1280 --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=checkpoints/coco_instance_eomt_large_1280_dinov3

Train from the DINOv3 backbone (converted with a fresh EoMT head; add `:res=1280` to both configs for 1280):

    python convert/torch_to_flax.py --src dinov3-vitl16 \
        --dst checkpoints/dinov3_large_coco_instance_640 --config configs/dinov3_coco_instance_large.py
    python -m eomt_jax.main --config=configs/dinov3_coco_instance_large.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov3_large_coco_instance_640

Variants: `configs/dinov3_coco_instance_large.py:res=1280` (per-block remat on by default); `:runlocal` is a
2-step smoke run of a tiny DINOv3 model on generated data.

Expected (original model zoo): mAP 45.9 at 640, mAP 49.9 at 1280 (pycocotools).
Sized for: 4 GPUs x batch 4, as the original; global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="instance",
        dataset="coco_instance",
        backbone="dinov3",
        size="L",
        resolutions=(640, 1280),
        num_classes=80,
        num_queries=200,
        epochs=12,
        anneal_starts=(14782, 29564, 44346, 59128),
        anneal_ends=(29564, 44346, 59128, 73910),
        eval_every_epochs=2,
        optimizer=dict(lr=2e-4, warmup_steps=(2000, 3000), llrd_l2_enabled=False),
    )
