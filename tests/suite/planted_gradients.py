"""A hand-written numpy attention with its backward, for planting gradient bugs in the suite's tests.

Vectorised, float32 results from float64 arithmetic, written without the project's code: projections,
masks, softmax, values, W_O, then the backward by the chain rule. ``bug="diagonal"`` is the published
one: the softmax's Jacobian taken as its diagonal alone (dz = p * dp, the rank-one part - p (p . dp)
dropped), which still "passes" checks that look only at the value gradients. ``bug="gqa_first"`` gives a
key/value head the gradient of the first query head of its group only (no sum over the group).
"""

from __future__ import annotations

import math

import numpy as np

from mha.testing.adapters import Adapter
from mha.testing.zoo._common import keep_mask

FEATURES = {"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "gqa", "grad"}


def vjp_fn(weights, *, bug=None):
    """fn.vjp(query, key, value, d_out, *, mask, key_mask, causal) -> (output, grads)."""
    H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
    G, s = H // Hkv, 1.0 / math.sqrt(D)
    w = {n: None if a is None else np.asarray(a, np.float64) for n, a in weights.to_dict().items()}

    def proj(x, name, heads):
        y = x @ w[f"{name}_weight"].T + (0 if w[f"{name}_bias"] is None else w[f"{name}_bias"])
        return y.reshape(x.shape[0], x.shape[1], heads, D).transpose(0, 2, 1, 3)  # (B, heads, L, D)

    def vjp(query, key, value, d_out, *, mask=None, key_mask=None, causal=False):
        xq, xk, xv, dy = (np.asarray(a, np.float64) for a in (query, key, value, d_out))
        B, T, S = xq.shape[0], xq.shape[1], xk.shape[1]
        q, k, v = proj(xq, "q", H), proj(xk, "k", Hkv), proj(xv, "v", Hkv)
        kr, vr = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # (B, H, S, D)
        keep, add = keep_mask(B, H, T, S, mask, key_mask, causal)
        z = s * q @ kr.transpose(0, 1, 3, 2) + (0 if add is None else add)
        z = np.where(keep, z, -np.inf)
        seen = keep.any(-1, keepdims=True)
        e = np.exp(z - np.where(seen, z.max(-1, keepdims=True), 0))
        p = np.where(seen, e / np.where(seen, e.sum(-1, keepdims=True), 1), 0)  # (B, H, T, S)
        ctx = p @ vr  # (B, H, T, D)
        merged = ctx.transpose(0, 2, 1, 3).reshape(B, T, H * D)
        out = merged @ w["o_weight"].T + (0 if w["o_bias"] is None else w["o_bias"])
        g = {"o_weight": dy.reshape(-1, dy.shape[-1]).T @ merged.reshape(-1, H * D),
             "o_bias": None if w["o_bias"] is None else dy.sum((0, 1))}
        dctx = (dy @ w["o_weight"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        dp = dctx @ vr.transpose(0, 1, 3, 2)
        dz = p * dp if bug == "diagonal" else p * (dp - (p * dp).sum(-1, keepdims=True))
        dq = s * dz @ kr
        dkr, dvr = s * dz.transpose(0, 1, 3, 2) @ q, p.transpose(0, 1, 3, 2) @ dctx
        group = (lambda a: a[:, ::G]) if bug == "gqa_first" else \
            (lambda a: a.reshape(B, Hkv, G, S, D).sum(2))
        for name, x, d, key_ in (("q", xq, dq, "query"), ("k", xk, group(dkr), "key"), ("v", xv, group(dvr), "value")):
            d2 = d.transpose(0, 2, 1, 3).reshape(B, x.shape[1], -1)
            g[f"{name}_weight"] = d2.reshape(-1, d2.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            g[f"{name}_bias"] = None if w[f"{name}_bias"] is None else d2.sum((0, 1))
            g[key_] = d2 @ w[f"{name}_weight"]
        return out.astype(np.float32), {n: None if a is None else a.astype(np.float32) for n, a in g.items()}

    return vjp


def adapter(name: str = "planted", bug=None) -> Adapter:
    """An adapter whose forward is right and whose gradients carry ``bug`` (None: right too)."""
    def build(weights):
        vjp = vjp_fn(weights, bug=bug)

        def fn(query, key, value, **masks):
            return vjp(query, key, value, np.zeros((query.shape[0], query.shape[1], weights.embed_dim)), **masks)[0]

        fn.vjp = vjp
        return fn

    return Adapter(name, FEATURES, build, conventions={"nonfinite": "propagates"})  # 0 * NaN reaches dW
