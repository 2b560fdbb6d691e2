"""torch: ``nn.MultiheadAttention`` on each of its two paths, and ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import numpy as np

from ..adapters import TorchAdapter
from ._autodiff import torch_sdpa_vjp
from ._common import additive, f32, keep_mask

_MHA_NOTES = {"gqa": "nn.MultiheadAttention has no grouped-query heads", "head_mask": "no head_mask argument",
              "scale": "the scale is fixed at 1/sqrt(head_dim)",
              "causal": "is_causal is only a hint that attn_mask is causal: the caller builds the mask",
              "rope": "no rotary embeddings", "window": "no sliding window", "cache": "no key/value cache"}


class TorchMHA(TorchAdapter):
    """``torch.nn.MultiheadAttention`` (batch_first, eval) on one path: ``"fast"`` always calls it with
    need_weights=False (SDPA inside, or the fused native kernel for self-attention), ``"weights"``
    always with need_weights=True (the explicit softmax that returns the weights)."""

    def __init__(self, path: str):
        if path not in ("fast", "weights"):
            raise ValueError(f"path must be 'fast' or 'weights', got {path!r}")
        self.path = path
        self.name = f"torch-mha-{path}"
        base = {"cross", "kdim", "bias", "mask", "additive_mask", "key_mask"}
        self.features = frozenset(base | ({"weights"} if path == "weights" else set()))
        self.notes = dict(_MHA_NOTES)
        if path == "fast":
            self.notes["weights"] = "the fast path returns no weights (see torch-mha-weights)"
        # the weights path: softmax over all -inf is NaN; the fast path: SDPA's math kernel gives 0 there.
        # On both, 0 * NaN at a hidden value is NaN.
        self.conventions = {"empty_row": "nan" if path == "weights" else "output_bias", "nonfinite": "propagates"}

    def build(self, weights, dtype="float32"):
        inner = super().build(weights, dtype=dtype)

        def fn(query, key, value, *, return_weights=False, **masks):
            if self.path == "fast":
                return inner(query, key, value, **masks)
            out, w = inner(query, key, value, return_weights=True, **masks)
            return (out, w) if return_weights else out

        return fn


class TorchSDPA:
    """``torch.nn.functional.scaled_dot_product_attention`` called directly, with the projections and
    head split written in torch around it: is_causal for a causal call without masks (top-left
    aligned, as torch documents), a bool or float attn_mask (B, H, T, S) otherwise, enable_gqa."""

    name = "torch-sdpa"
    features = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "gqa", "scale",
                          "grad"})
    notes = {"weights": "SDPA returns no weights", "head_mask": "no head_mask argument",
             "rope": "no rotary embeddings", "window": "no sliding window", "cache": "no key/value cache"}
    conventions = {"causal": "top_left", "nonfinite": "propagates"}
    dtypes = ("float32", "float16", "bfloat16")

    def build(self, weights, scale=None, dtype="float32"):
        import torch
        import torch.nn.functional as F

        H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
        dt = getattr(torch, dtype)
        t = {n: None if a is None else torch.from_numpy(f32(a)).to(dt) for n, a in weights.to_dict().items()}

        def heads(x, name, n):
            y = F.linear(torch.from_numpy(f32(x)).to(dt), t[f"{name}_weight"], t[f"{name}_bias"])
            B, L, _ = y.shape
            return y.view(B, L, n, D).transpose(1, 2)  # (B, n, L, D)

        def fn(query, key, value, *, mask=None, key_mask=None, causal=False):
            B, T, _ = query.shape
            S = key.shape[1]
            kwargs = {"scale": scale, "enable_gqa": Hkv != H}
            if mask is None and key_mask is None:
                kwargs["is_causal"] = bool(causal)
            else:
                keep, add = keep_mask(B, H, T, S, mask, key_mask, causal, align="top_left")
                am = keep if add is None else additive(keep, add)
                kwargs["attn_mask"] = torch.from_numpy(np.ascontiguousarray(am))
                kwargs["attn_mask"] = kwargs["attn_mask"] if add is None else kwargs["attn_mask"].to(dt)
            with torch.no_grad():
                o = F.scaled_dot_product_attention(heads(query, "q", H), heads(key, "k", Hkv),
                                                   heads(value, "v", Hkv), **kwargs)  # (B, H, T, D)
                y = F.linear(o.transpose(1, 2).reshape(B, T, H * D), t["o_weight"], t["o_bias"])
            return y.float().numpy()

        fn.vjp = torch_sdpa_vjp(weights, scale, dtype)  # gradients by torch autograd
        return fn
