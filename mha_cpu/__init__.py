"""mha_cpu: the numpy backend of mha-twin (any CPU).

``mha_cpu.attend`` is the backend's attention core (docs/architecture.md); ``mha_cpu.options`` what a user
may tune (``with mha_cpu.options.override(threads=1): ...``); ``mha_cpu.small_blocks()`` runs every branch
of the fast path on tiny problems (for tests).
"""

from ._kernel import attend
from ._layer import MultiHeadAttention
from ._options import Options, options, small_blocks

__all__ = ["MultiHeadAttention", "Options", "attend", "options", "small_blocks"]
