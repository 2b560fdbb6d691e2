"""mha_cpu: the numpy backend of mha-twin (any CPU).

``mha_cpu.options`` holds what a user may tune (worker threads, block sizes, the memory kept for reusable
temporaries); every other choice is made per call. The fast path keeps its temporaries (up to
``options.scratch_bytes`` each) per thread from call to call; ``mha_cpu.free_scratch()`` lets them go.
``mha_cpu.small_blocks()`` runs every branch of the fast path on tiny problems (for tests).
"""

from ._attend import attend
from ._layer import MultiHeadAttention
from ._options import Options, options, small_blocks
from ._pool import free_scratch

__all__ = ["MultiHeadAttention", "attend", "Options", "free_scratch", "options", "small_blocks"]
