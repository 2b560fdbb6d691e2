"""Multi-head attention and its gradients in torch (autograd over the explicit math), the test reference.

Every feature of the layer, in this project's semantics: bool masks True = may attend, float masks added
(-inf hides), key_mask (B, S), causal and window aligned at the end, GQA (query head h reads key/value
head h // (H / Hkv)), head_mask, RoPE (split-half or traditional), a dropout multiplier given as an
array; a query that sees no key gets zero weights (its logits are set to 0 before the softmax and its
weights to 0 after, so that no NaN reaches the gradients). Slow and plain on purpose.
"""

from __future__ import annotations

import math

import numpy as np

from mha.testing.zoo._autodiff import torch_leaves

NAMES = ("q_weight", "k_weight", "v_weight", "o_weight", "q_bias", "k_bias", "v_bias", "o_bias")


def _rope(torch, x, rope, first: int):
    """(B, n, L, D) rotated at positions first .. first + L - 1."""
    L, D = x.shape[-2], x.shape[-1]
    d = rope.rotated_dims(D)
    theta = rope.angles(first, L, d)  # (L, d/2) float64
    cos, sin = (torch.tensor(f(theta), dtype=x.dtype) for f in (np.cos, np.sin))
    if rope.traditional:
        a, b = x[..., 0:d:2], x[..., 1:d:2]
        rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(*x.shape[:-1], d)
    else:
        a, b = x[..., : d // 2], x[..., d // 2: d]
        rot = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return torch.cat([rot, x[..., d:]], dim=-1) if d < D else rot


def visible(B, H, T, S, mask=None, key_mask=None, causal=False, window=None):
    """(B, H, T, S) bool."""
    vis = np.ones((B, H, T, S), bool)
    if mask is not None:
        m = np.asarray(mask)
        m = np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), (B, H, T, S))
        vis &= (m != -np.inf) if m.dtype.kind == "f" else m.astype(bool)
    if key_mask is not None:
        vis &= np.asarray(key_mask, bool)[:, None, None, :]
    dist = np.arange(T)[:, None] + (S - T) - np.arange(S)[None, :]
    if causal:
        vis &= dist >= 0
    if window is not None:
        vis &= np.abs(dist) < window
    return vis


def mha_vjp(weights, query, key, value, d_out, *, mask=None, key_mask=None, causal=False, head_mask=None,
            rope=None, window=None, dropout=None, scale=None, softcap=None, qk_norm=None, dtype="float64"):
    """(output, {name: gradient}) as numpy float64, computed by torch autograd in ``dtype``. ``softcap`` c:
    logits c tanh(l / c) before the additive mask; ``qk_norm`` eps: RMSNorm of each query and key head with
    weights.q_norm, k_norm (before RoPE); weights.sinks (H,) when present: learned sink logits."""
    import torch

    dt = getattr(torch, dtype)
    H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
    w, x = torch_leaves(weights, query, key, value, dt)
    extra = {n: torch.tensor(np.asarray(getattr(weights, n), np.float64), dtype=dt, requires_grad=True)
             for n in ("q_norm", "k_norm", "sinks") if getattr(weights, n, None) is not None}
    w.update(extra)
    B, T, _ = query.shape
    S = key.shape[1]

    def proj(name, inp, n):
        y = inp @ w[f"{name}_weight"].T
        if w[f"{name}_bias"] is not None:
            y = y + w[f"{name}_bias"]
        return y.reshape(B, -1, n, D).transpose(1, 2)  # (B, n, L, D)

    q, k, v = proj("q", x["query"], H), proj("k", x["key"], Hkv), proj("v", x["value"], Hkv)
    if qk_norm is not None:
        q, k = (a / torch.sqrt((a * a).mean(-1, keepdim=True) + qk_norm) * w[f"{n}_norm"] for a, n in ((q, "q"), (k, "k")))
    if rope is not None:
        q, k = _rope(torch, q, rope, S - T), _rope(torch, k, rope, 0)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    s = 1.0 / math.sqrt(D) if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * s  # (B, H, T, S)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None and np.asarray(mask).dtype.kind == "f":
        m = np.asarray(mask, np.float64)
        logits = logits + torch.tensor(np.where(np.isneginf(m), 0.0, m), dtype=dt)
    vis = torch.tensor(visible(B, H, T, S, mask, key_mask, causal, window))
    any_vis = vis.any(-1, keepdim=True)
    logits = torch.where(vis, logits, torch.tensor(float("-inf"), dtype=dt))
    if "sinks" in w:  # one more column per row, holding the head's sink, no value
        col = w["sinks"][None, :, None, None].expand(B, H, T, 1)
        P = torch.softmax(torch.cat([logits, col], -1), dim=-1)[..., :S]
    else:
        logits = torch.where(any_vis, logits, torch.zeros((), dtype=dt))
        P = torch.softmax(logits, dim=-1) * any_vis
    if dropout is not None:
        P = P * torch.tensor(np.asarray(dropout, np.float64), dtype=dt)
    ctx = P @ v  # (B, H, T, D)
    if head_mask is not None:
        ctx = ctx * torch.tensor(np.asarray(head_mask, np.float64), dtype=dt).reshape(-1, H, 1, 1)
    out = ctx.transpose(1, 2).reshape(B, T, H * D) @ w["o_weight"].T
    if w["o_bias"] is not None:
        out = out + w["o_bias"]
    out.backward(torch.tensor(np.asarray(d_out, np.float64), dtype=dt))
    grads = {n: None if t is None else t.grad.double().numpy() for n, t in {**w, **x}.items()}
    return out.detach().double().numpy(), grads
