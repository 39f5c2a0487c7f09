"""ADE20K semantic: EoMT-L (DINOv3), semantic segmentation.

The original's `configs/dinov3/ade20k/semantic/eomt_large_512.yaml`. Against the DINOv2 setting
(`ade20k_semantic_large.py`): lr 2e-4, warm-up (2000, 3000) steps, no layer-wise decay (`llrd=1.0`: every
parameter trains at 2e-4; `lr_mult=0.1` is the original's value and changes no learning rate, see
`eomt_jax/optim.py`), 16 epochs instead of 31, the first masked block annealed over steps 0-3000 and the others
over the shorter run.

Validate the published model. Its file stores the difference to the DINOv3 backbone, so the conversion reads the
backbone too; that one is gated: accept its licence on huggingface.co/facebook/dinov3-vitl16-pretrain-lvd1689m,
then `huggingface-cli login`.

    huggingface-cli download facebook/dinov3-vitl16-pretrain-lvd1689m --local-dir dinov3-vitl16
    huggingface-cli download tue-mps/ade_semantic_eomt_large_512_dinov3 pytorch_model.bin \
        --local-dir ade_semantic_eomt_large_512_dinov3
    python convert/torch_to_flax.py --src ade_semantic_eomt_large_512_dinov3/pytorch_model.bin \
        --base dinov3-vitl16 --dst checkpoints/ade_semantic_eomt_large_512_dinov3 \
        --config configs/dinov3_ade20k_semantic_large.py
    python -m eomt_jax.main --config=configs/dinov3_ade20k_semantic_large.py --mode=eval --workdir=W \
        --config.data.root=DATA --config.init_from=checkpoints/ade_semantic_eomt_large_512_dinov3

Train from the DINOv3 backbone (converted once, with a fresh EoMT head):

    python convert/torch_to_flax.py --src dinov3-vitl16 \
        --dst checkpoints/dinov3_large_ade20k_semantic_512 --config configs/dinov3_ade20k_semantic_large.py
    python -m eomt_jax.main --config=configs/dinov3_ade20k_semantic_large.py --workdir=W --config.data.root=DATA \
        --config.init_from=checkpoints/dinov3_large_ade20k_semantic_512

Variant: `configs/dinov3_ade20k_semantic_large.py:runlocal` is a 2-step smoke run of a tiny DINOv3 model on
generated data.

Expected (original model zoo): mIoU 59.5.
Sized for: 4 GPUs x batch 4, as the original; global batch 16.
"""

from eomt_jax import config_lib


def get_config(arg=None):
    return config_lib.experiment(
        arg,
        task="semantic",
        dataset="ade20k_semantic",
        backbone="dinov3",
        size="L",
        resolutions=(512,),
        num_classes=150,
        num_queries=100,
        epochs=16,
        anneal_starts=(0, 6520, 9780, 13040),
        anneal_ends=(3000, 9780, 13040, 16300),
        optimizer=dict(lr=2e-4, warmup_steps=(2000, 3000), llrd=1.0, lr_mult=0.1),
    )
