"""mha_cpu: the numpy backend of mha-twin (any CPU)."""

from ._layer import MultiHeadAttention

__all__ = ["MultiHeadAttention"]
