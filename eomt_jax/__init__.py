"""EoMT (Encoder-only Mask Transformer) in JAX / Flax NNX.

    from eomt_jax import Segmenter
    result = Segmenter("checkpoints/coco_panoptic_eomt_large_640")("street.jpg")

`Segmenter` and `Segmentation` (`eomt_jax.segmenter`) are imported on first use, so that `import eomt_jax` stays
cheap for the command-line modules.
"""

__version__ = "0.1.0"
__all__ = ["Segmentation", "Segmenter"]


def __getattr__(name):
    if name in __all__:
        from eomt_jax import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'eomt_jax' has no attribute {name!r}")
