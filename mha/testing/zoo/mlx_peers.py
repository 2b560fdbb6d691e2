"""MLX: ``mlx.nn.MultiHeadAttention`` and ``mx.fast.scaled_dot_product_attention`` called directly."""

from __future__ import annotations

import numpy as np

from ..adapters import MlxNNAdapter
from ._autodiff import mlx_sdpa_vjp, mx_mask
from ._common import f32


class MlxNN(MlxNNAdapter):
    """``mlx.nn.MultiHeadAttention`` with its conventions declared: it has no causal flag and no key
    mask, so masks are combined into one bool (or additive) mask, as it accepts."""

    name = "mlx-nn-mha"
    features = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask"})
    notes = dict(MlxNNAdapter.notes, causal="no causal flag: the caller builds the mask")
    # its fused kernel fills a bool mask's False entries with the dtype's lowest value
    conventions = {"empty_row": "mean_value", "nonfinite": "propagates"}


class MxFastSDPA:
    """``mx.fast.scaled_dot_product_attention`` called directly, with projections and head split in MLX
    around it: mask="causal" for a causal call without other masks (bottom-right aligned, as MLX
    documents), a bool or additive (B, H, T, S) mask array otherwise; GQA natively."""

    name = "mlx-fast-sdpa"
    features = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "gqa", "scale",
                          "grad"})
    notes = {"weights": "the fused kernel returns no weights", "head_mask": "no head_mask argument",
             "rope": "RoPE is a separate mx.fast.rope", "window": "no sliding window", "cache": "no key/value cache"}
    conventions = {"empty_row": "mean_value", "nonfinite": "propagates"}
    dtypes = ("float32", "float16", "bfloat16")

    def build(self, weights, scale=None, dtype="float32"):
        import mlx.core as mx

        H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
        dt = getattr(mx, dtype)
        s = float(D ** -0.5 if scale is None else scale)
        w = {n: None if a is None else mx.array(f32(a)).astype(dt) for n, a in weights.to_dict().items()}

        def linear(x, name):
            y = x @ w[f"{name}_weight"].T
            return y if w[f"{name}_bias"] is None else y + w[f"{name}_bias"]

        def heads(x, name, n):
            y = linear(mx.array(f32(x)).astype(dt), name)
            B, L, _ = y.shape
            return y.reshape(B, L, n, D).transpose(0, 2, 1, 3)  # (B, n, L, D)

        def fn(query, key, value, *, mask=None, key_mask=None, causal=False):
            B, T, _ = query.shape
            m = mx_mask(H, query, key, mask, key_mask, causal, dt)
            o = mx.fast.scaled_dot_product_attention(heads(query, "q", H), heads(key, "k", Hkv),
                                                     heads(value, "v", Hkv), scale=s, mask=m)  # (B, H, T, D)
            y = linear(o.transpose(0, 2, 1, 3).reshape(B, T, H * D), "o")
            return np.array(y.astype(mx.float32))

        fn.vjp = mlx_sdpa_vjp(weights, scale, dtype)  # gradients by mx.vjp
        return fn
