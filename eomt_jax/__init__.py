"""EoMT (Encoder-only Mask Transformer) in JAX / Flax NNX."""

__version__ = "0.1.0"
