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

from ._layer import MultiHeadAttention, fused_attention
from ._options import Options, options, small_blocks


def attend(q, k, v, masks, *, scale, softcap=None, sinks=None, dropout=None, return_weights=False):
    """The MLX attention core (docs/architecture.md): for now :func:`mha.reference.attend` on mx arrays,
    softmax in float32 (core-mlx replaces it with the fused/blockwise core)."""
    import mlx.core as mx

    from mha.reference import attend as reference

    return reference(mx, q, k, v, masks, scale=scale, softcap=softcap, sinks=sinks, dropout=dropout,
                     return_weights=return_weights, acc_dtype=mx.float32)


__all__ = ["MultiHeadAttention", "Options", "attend", "fused_attention", "options", "small_blocks"]
