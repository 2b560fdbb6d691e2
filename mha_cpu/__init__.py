"""mha_cpu: the numpy backend of mha-twin (any CPU).

``mha_cpu.options`` tunes the fast path (block sizes, threads, the split of self-attention, the reuse of
temporaries); the defaults are chosen per call. The fast path keeps its temporaries (up to
``options.scratch_bytes`` each) per thread from call to call; ``mha_cpu.free_scratch()`` lets them go.
"""

from ._fast import free_scratch, options
from ._layer import MultiHeadAttention

__all__ = ["MultiHeadAttention", "free_scratch", "options"]
