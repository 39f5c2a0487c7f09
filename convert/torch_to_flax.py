"""Convert a PyTorch EoMT (or DINOv2 / DINOv3 backbone) checkpoint into an Orbax checkpoint directory.

    python convert/torch_to_flax.py --src pytorch_model.bin --dst out/
    python convert/torch_to_flax.py --src hf_eomt_dir/ --dst out/ --dtype bfloat16
    python convert/torch_to_flax.py --src dinov2_vitl14_reg4.safetensors --dst init/ \
        --config configs/coco_panoptic_large.py
    python convert/torch_to_flax.py --src coco_panoptic_eomt_large_640_dinov3/pytorch_model.bin \
        --base dinov3-vitl16-pretrain-lvd1689m/ --dst out/
    python convert/torch_to_flax.py --src dinov3-vitl16-pretrain-lvd1689m/ --dst init/ \
        --config configs/dinov3_coco_panoptic_large.py

SRC: the original's model-zoo `pytorch_model.bin`, a Hugging Face EoMT or EoMT-DINOv3 directory (config.json +
weights) or weights file, a DINOv2 backbone (timm or Hugging Face names), a DINOv3 backbone (Hugging Face or Meta
names), or a Hugging Face hub id (needs huggingface_hub and network). The DINOv3 zoo files are differences from the
gated DINOv3 backbone named by --base (an error says which one when it is missing).
The architecture is read from the weights; `--config FILE[:ARG]` (its `model` section) and `--set key=value`
override or cross-check it. DINOv3 weights do not tell the image size: it comes from --config, --set image_size=...,
config.json, or the zoo name in SRC's path. Load the result with `eomt_jax.pretrained.load(DST)`.
"""

import sys

from eomt_jax.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
