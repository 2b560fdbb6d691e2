"""mha_cpu: the numpy backend of mha-twin (any CPU).

``mha_cpu.options`` tunes the fast path (block sizes, threads); the defaults are chosen per call.
"""

from ._fast import options
from ._layer import MultiHeadAttention

__all__ = ["MultiHeadAttention", "options"]
