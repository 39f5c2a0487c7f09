"""COCO panoptic: EoMT-B (DINOv3), panoptic segmentation, 2x schedule.

The original's `configs/dinov3/coco/panoptic/eomt_base_640_2x.yaml`. Against the DINOv2 setting
(`coco_panoptic_base.py`): lr 2e-4, warm-up (2000, 3000) steps, the K query blocks trained without layer-wise
decay (`llrd_l2_enabled=False`), and the first masked block annealed over steps 0-3000.

Validate the published model. Its file stores the difference to the DINOv3 backbone, so the conversion reads the
backbone too; that one is gated: accept its licence on huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m,
then `huggingface-cli login`.

    huggingface-cli download facebook/dinov3-vitb16-pretrain-lvd1689m --local-dir dinov3-vitb16
    huggingface-cli download tue-mps/coco_panoptic_eomt_base_640_dinov3 pytorch_model.bin \
        --local-dir coco_panoptic_eomt_base_640_dinov3
    python convert/torch_to_flax.py --src coco_panoptic_eomt_base_640_dinov3/pytorch_model.bin \
        --base dinov3-vitb16 --dst checkpoints/coco_panoptic_eomt_base_640_dinov3 \
        --config configs/dinov3_coco_panoptic_base.py
    python -m eomt_jax.main --config=configs/dinov3_coco_panoptic_base.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=checkpoints/coco_panoptic_eomt_base_640_dinov3

Train from the DINOv3 backbone (converted once, with a fresh EoMT head):

    python convert/torch_to_flax.py --src dinov3-vitb16 \
        --dst checkpoints/dinov3_base_coco_panoptic_640 --config configs/dinov3_coco_panoptic_base.py
    python -m eomt_jax.main --config=configs/dinov3_coco_panoptic_base.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov3_base_coco_panoptic_640

Variant: `configs/dinov3_coco_panoptic_base.py:runlocal` is a 2-step smoke run of a tiny DINOv3 model on
generated data.

Expected (original model zoo): PQ 53.1.
Sized for: 4 GPUs x batch 4, as the original; global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="panoptic",
        dataset="coco_panoptic",
        backbone="dinov3",
        size="B",
        resolutions=(640,),
        num_classes=133,
        num_queries=200,
        epochs=24,
        anneal_starts=(0, 73910, 118256),
        anneal_ends=(3000, 103474, 147820),
        optimizer=dict(lr=2e-4, warmup_steps=(2000, 3000), llrd_l2_enabled=False),
    )
