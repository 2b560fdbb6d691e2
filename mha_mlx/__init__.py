"""mha_mlx: the MLX backend of mha-twin (Apple GPU via Metal, CUDA, or CPU).

``mha_mlx.options`` sets the memory budget above which a call runs blockwise instead of MLX's fused
kernel (``score_bytes``) and the block sizes; ``mha_mlx.small_blocks()`` runs every call blockwise in
tiny blocks (for tests).
"""

try:
    import mlx.core  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised where MLX is absent
    from mha._backends import MLX_INSTALL

    raise ImportError(f"mha_mlx needs MLX, which is not installed: {MLX_INSTALL}") from err

from ._core import attend
from ._layer import MultiHeadAttention, fused_attention
from ._options import Options, options, small_blocks

__all__ = ["MultiHeadAttention", "Options", "attend", "fused_attention", "options", "small_blocks"]
