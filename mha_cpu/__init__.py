"""mha_cpu: the numpy backend of mha-twin (any CPU).

``mha_cpu.attend`` is the backend's attention core (docs/architecture.md); ``mha_cpu.options`` holds what a
user may tune (worker threads, block sizes, BLAS threads for small calls, the memory kept for reusable
temporaries; ``with mha_cpu.options.override(threads=1): ...``). The fast path keeps its temporaries per
thread from call to call; ``mha_cpu.free_scratch()`` lets them go. ``mha_cpu.small_blocks()`` runs every
branch of the fast path on tiny problems (for tests).
"""

from ._kernel import attend
from ._layer import MultiHeadAttention
from ._options import Options, options, small_blocks
from ._workers import free_scratch

__all__ = ["MultiHeadAttention", "Options", "attend", "free_scratch", "options", "small_blocks"]
