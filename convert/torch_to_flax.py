"""Convert a PyTorch EoMT (or DINOv2 backbone) checkpoint into an Orbax checkpoint directory.

    python convert/torch_to_flax.py --src pytorch_model.bin --dst out/
    python convert/torch_to_flax.py --src hf_eomt_dir/ --dst out/ --dtype bfloat16
    python convert/torch_to_flax.py --src dinov2_vitl14_reg4.safetensors --dst init/ \
        --config configs/coco_panoptic_large.py

SRC: the original's model-zoo `pytorch_model.bin`, a Hugging Face EoMT directory (config.json + weights) or weights
file, a DINOv2 backbone (timm or Hugging Face names), or a Hugging Face hub id (needs huggingface_hub and network).
The architecture is read from the weights; `--config FILE[:ARG]` (its `model` section) and `--set key=value`
override or cross-check it. Load the result with `eomt_jax.pretrained.load(DST)`.
"""

import sys

from eomt_jax.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
