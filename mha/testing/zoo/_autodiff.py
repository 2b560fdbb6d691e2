"""Gradients of the zoo's peers by their own autodiff: torch autograd through
``F.scaled_dot_product_attention`` and ``mx.vjp`` through ``mx.fast.scaled_dot_product_attention``.

Each helper returns the ``fn.vjp(query, key, value, d_out, **masks) -> (output, grads)`` of the adapter
protocol (mha.testing.adapters, feature "grad"): the peer's forward, as its adapter computes it (the same
projections, head split and mask translation), run under autodiff with the weights and the three inputs
as leaves. Float64 inputs run in float64 where the library computes in it (torch), else in the
adapter's dtype.
"""

from __future__ import annotations

import numpy as np

from ._common import additive, f32, keep_mask

_NAMES = ("q_weight", "k_weight", "v_weight", "o_weight", "q_bias", "k_bias", "v_bias", "o_bias")


def torch_leaves(weights, query, key, value, dt):
    """({weight name: tensor or None}, {"query"|"key"|"value": tensor}): leaves of autograd in torch dtype
    ``dt`` (requires_grad), from numpy arrays."""
    import torch

    w = {n: None if a is None else torch.tensor(np.asarray(a, np.float64), dtype=dt, requires_grad=True)
         for n, a in weights.to_dict().items()}
    x = {n: torch.tensor(np.asarray(a, np.float64), dtype=dt, requires_grad=True)
         for n, a in (("query", query), ("key", key), ("value", value))}
    return w, x


def mx_mask(H: int, query, key, mask, key_mask, causal: bool, dt):
    """The ``mask`` argument of mx.fast.scaled_dot_product_attention for this project's mask arguments:
    "causal" (bottom-right, as MLX documents) or None without other masks, else a bool or additive
    (B, H, T, S) array in ``dt``."""
    import mlx.core as mx

    if mask is None and key_mask is None:
        return "causal" if causal else None
    B, T, S = query.shape[0], query.shape[1], key.shape[1]
    keep, add = keep_mask(B, H, T, S, mask, key_mask, causal, align="bottom_right")
    return mx.array(keep) if add is None else mx.array(additive(keep, add)).astype(dt)


def torch_sdpa_vjp(weights, scale, dtype: str):
    """fn.vjp for mha.testing.zoo.torch_peers.TorchSDPA (causal top-left, as torch documents)."""
    import torch
    import torch.nn.functional as F

    H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim

    def vjp(query, key, value, d_out, *, mask=None, key_mask=None, causal=False):
        dt = torch.float64 if np.asarray(query).dtype == np.float64 else getattr(torch, dtype)
        w, x = torch_leaves(weights, query, key, value, dt)
        B, T, _ = query.shape
        S = key.shape[1]

        def heads(name, inp, n):
            y = F.linear(inp, w[f"{name}_weight"], w[f"{name}_bias"])
            return y.view(B, -1, n, D).transpose(1, 2)  # (B, n, L, D)

        kwargs = {"scale": scale, "enable_gqa": Hkv != H}
        if mask is None and key_mask is None:
            kwargs["is_causal"] = bool(causal)
        else:
            keep, add = keep_mask(B, H, T, S, mask, key_mask, causal, align="top_left")
            am = torch.from_numpy(np.ascontiguousarray(keep if add is None else additive(keep, add)))
            kwargs["attn_mask"] = am if add is None else am.to(dt)
        o = F.scaled_dot_product_attention(heads("q", x["query"], H), heads("k", x["key"], Hkv),
                                           heads("v", x["value"], Hkv), **kwargs)
        y = F.linear(o.transpose(1, 2).reshape(B, T, H * D), w["o_weight"], w["o_bias"])
        y.backward(torch.tensor(np.asarray(d_out, np.float64), dtype=dt))
        grads = {n: None if t is None else t.grad.double().numpy() for n, t in {**w, **x}.items()}
        return y.detach().double().numpy(), grads

    return vjp


def mlx_sdpa_vjp(weights, scale, dtype: str):
    """fn.vjp for mha.testing.zoo.mlx_peers.MxFastSDPA (causal bottom-right, as MLX documents)."""
    import mlx.core as mx

    H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
    dt = getattr(mx, dtype)
    s = float(D ** -0.5 if scale is None else scale)
    names = [n for n in _NAMES if getattr(weights, n) is not None]

    def vjp(query, key, value, d_out, *, mask=None, key_mask=None, causal=False):
        B, T, _ = query.shape
        m = mx_mask(H, query, key, mask, key_mask, causal, dt)

        def forward(*arrays):
            w = dict(zip(names, arrays[:len(names)]))
            xq, xk, xv = arrays[len(names):]

            def linear(x, name):
                y = x @ w[f"{name}_weight"].T
                return y if f"{name}_bias" not in w else y + w[f"{name}_bias"]

            def heads(x, name, n):
                return linear(x, name).reshape(B, -1, n, D).transpose(0, 2, 1, 3)

            o = mx.fast.scaled_dot_product_attention(heads(xq, "q", H), heads(xk, "k", Hkv), heads(xv, "v", Hkv),
                                                     scale=s, mask=m)  # (B, H, T, D)
            return linear(o.transpose(0, 2, 1, 3).reshape(B, T, H * D), "o")

        primals = [mx.array(f32(getattr(weights, n))).astype(dt) for n in names]
        primals += [mx.array(f32(a)).astype(dt) for a in (query, key, value)]
        (y,), grads = mx.vjp(forward, primals, [mx.array(f32(d_out)).astype(dt)])
        g = dict(zip(names + ["query", "key", "value"], grads))
        out = {n: None if n not in g else np.array(g[n].astype(mx.float32), np.float64)
               for n in _NAMES + ("query", "key", "value")}
        return np.array(y.astype(mx.float32), np.float64), out

    return vjp
