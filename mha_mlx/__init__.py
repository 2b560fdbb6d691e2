"""mha_mlx: the MLX backend of mha-twin (Apple GPU via Metal, CUDA, or CPU)."""

try:
    import mlx.core  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised where MLX is absent
    from mha._backends import MLX_INSTALL

    raise ImportError(f"mha_mlx needs MLX, which is not installed: {MLX_INSTALL}") from err

from ._layer import MultiHeadAttention, fused_attention

__all__ = ["MultiHeadAttention", "fused_attention"]
