"""An independent float64 oracle: multi-head attention as an explicit loop over batch, head and query.

It shares no code with :mod:`mha._reference` or the backends: heads are cut out of the weight
matrices by slicing, masks are read entry by entry, and the softmax runs over the visible keys of one
row at a time. Slow and obvious on purpose; use it on small problems.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def visible_keys(B, H, T, S, *, mask=None, key_mask=None, causal=False, window=None, causal_align="bottom_right"):
    """(B, H, T, S) bool: which keys each query may see (mask AND key_mask AND causal AND window).

    A float ``mask`` hides exactly its -inf entries; bool/int masks hide their False/0 entries.
    ``causal_align``: "bottom_right" (query i sees j <= i + S - T) or "top_left" (j <= i).
    """
    offset = {"bottom_right": S - T, "top_left": 0}[causal_align]
    vis = np.ones((B, H, T, S), dtype=bool)
    if mask is not None:
        m = np.asarray(mask)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        m = np.broadcast_to(m, (B, H, T, S))
        vis &= (m != -np.inf) if m.dtype.kind == "f" else (m != 0)
    if key_mask is not None:
        km = np.asarray(key_mask).reshape(B, S)
        for b in range(B):
            vis[b, :, :, :] &= (km[b] != 0)[None, None, :]
    if causal:
        for i in range(T):
            for j in range(S):
                if j > i + offset:
                    vis[:, :, i, j] = False
    if window is not None:
        for i in range(T):
            for j in range(S):
                if abs(i + (S - T) - j) >= window:
                    vis[:, :, i, j] = False
    return vis


def rotate(x, rope, first_position: int):
    """RoPE as complex multiplication, float64: (B, L, D) rows at positions first_position + l.

    Pair p of the rotated d coordinates is the complex number z_p = x_a + i x_b, with (a, b) = (p, p + d/2)
    (split-half) or (2p, 2p + 1) (traditional); it becomes z_p exp(i (first_position + l) scale base^(-2p/d)).
    """
    x = np.array(x, dtype=np.float64)
    D = x.shape[-1]
    d = rope.rotated_dims(D)
    a = np.arange(d // 2) * 2 if rope.traditional else np.arange(d // 2)
    b = a + 1 if rope.traditional else a + d // 2
    z = x[..., a] + 1j * x[..., b]
    for l in range(x.shape[-2]):
        for p in range(d // 2):
            theta = (first_position + l) * rope.scale * rope.base ** (-2.0 * p / d)
            z[..., l, p] *= complex(math.cos(theta), math.sin(theta))
    x[..., a], x[..., b] = z.real, z.imag
    return x


def additive(B, H, T, S, mask=None):
    """(B, H, T, S) float64 added to the logits: the float mask with -inf read as 0 (hidden anyway)."""
    a = np.zeros((B, H, T, S))
    if mask is not None and np.asarray(mask).dtype.kind == "f":
        m = np.asarray(mask, dtype=np.float64)
        m = np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), (B, H, T, S))
        a = np.where(np.isneginf(m), 0.0, m)
    return a


def head_projections(weights, query, key, value):
    """Per-head projections in float64, by slicing: lists q[h] (B, T, D), k[g], v[g] (B, S, D)."""
    H, Hkv = weights.num_heads, weights.num_kv_heads
    D = weights.head_dim
    w = {n: _f64(a) for n, a in weights.to_dict().items()}
    xq, xk, xv = _f64(query), _f64(key), _f64(value)

    def proj(x, W, b, head):
        rows = slice(head * D, (head + 1) * D)
        y = np.einsum("bli,oi->blo", x, W[rows])
        return y if b is None else y + b[rows]

    qs = [proj(xq, w["q_weight"], w["q_bias"], h) for h in range(H)]
    ks = [proj(xk, w["k_weight"], w["k_bias"], g) for g in range(Hkv)]
    vs = [proj(xv, w["v_weight"], w["v_bias"], g) for g in range(Hkv)]
    return qs, ks, vs


def rms_normalised(x, weight, eps: float):
    """x / sqrt(mean over the last axis of x^2 + eps) * weight, float64, one row at a time."""
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        out[idx] = row / math.sqrt(float(np.mean(row * row)) + eps) * weight
    return out


def _logits(scale, q, k, add):
    """scale * q . k_j + add_j for the keys k (n, D) of one query q (D,), without overflow: q and k are
    divided by powers of 2 (exact) before the products, and where scale * |q| |k| passes float64's
    range the logits that are not the largest differ from it by more than float64 can hold, so only
    the keys of the largest product keep a finite logit (their mask terms decide among them)."""
    qa = _pow2(np.abs(q).max(initial=0.0))
    ka = _pow2(np.abs(k).max(initial=0.0))
    r = (k / ka) @ (q / qa)  # (n,): |r| <= D
    c = scale * qa * ka
    if np.isfinite(c * (q.size + 1)):
        return c * r + add
    return np.where(r == r.max(), add, -np.inf) if c > 0 else np.where(r == r.min(), add, -np.inf)


def _pow2(x: float) -> float:
    """The power of 2 at or above ``x`` (1 for 0): dividing by it is exact."""
    return float(np.ldexp(1.0, int(np.frexp(x)[1]))) if x > 0 else 1.0


def _capped(scale, q, k, add, softcap):
    """The logits of one query with Gemma 2's soft cap, c * tanh(scale * q . k_j / c) + add_j, formed in
    the same overflow-free units as :func:`_logits` (tanh of a product past float64's range is +-1)."""
    if softcap is None:
        return _logits(scale, q, k, add)
    qa = _pow2(np.abs(q).max(initial=0.0))
    ka = _pow2(np.abs(k).max(initial=0.0))
    r = (k / ka) @ (q / qa)  # (n,): |r| <= D
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.tanh((scale / softcap) * qa * ka * r)
    t = np.where(np.isnan(t), 0.0, t)  # inf * 0: a zero product
    return softcap * t + add


def attention(weights, query, key=None, value=None, *, mask=None, key_mask=None, causal=False,
              head_mask=None, scale=None, rope=None, window=None, causal_align="bottom_right",
              empty_row="output_bias", softcap=None, qk_norm=None):
    """Float64 multi-head attention on batched numpy inputs; returns ``(output, weights)``.

    Layer features: ``qk_norm`` (the epsilon) RMS-normalises each query and key head with the weights'
    ``q_norm``/``k_norm`` before RoPE (weights holding them need it); ``softcap`` c makes each logit
    c * tanh(logit / c) before the additive mask; the weights' ``sinks`` (H,) add exp(sink_h) to each
    row's denominator (the weights then sum to less than 1; a row with no visible key stays all zero).

    ``rope`` (an mha.RoPE) rotates query i at position (S - T) + i and key j at j; ``window`` W hides
    keys with |i + (S - T) - j| >= W. ``causal_align`` and ``empty_row`` follow a declared convention
    (mha.testing.conventions): a query that sees no key gets zero weights and context ("output_bias"),
    NaN weights and context ("nan"; also "unspecified", which nothing can be compared with), or
    uniform weights over all S keys ("mean_value").

    query (B, T, E); key (B, S, kdim); value (B, S, vdim) -> output (B, T, E), weights (B, H, T, S).
    """
    key = query if key is None else key
    value = key if value is None else value
    H, Hkv = weights.num_heads, weights.num_kv_heads
    E = weights.embed_dim
    D = weights.head_dim
    group = H // Hkv
    B, T, _ = np.shape(query)
    S = np.shape(key)[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qs, ks, vs = head_projections(weights, query, key, value)
    if (weights.q_norm is not None) != (qk_norm is not None):
        raise ValueError("qk_norm (the epsilon) must be given exactly when the weights hold q_norm/k_norm")
    if qk_norm is not None:
        qs = [rms_normalised(q, _f64(weights.q_norm), qk_norm) for q in qs]
        ks = [rms_normalised(k, _f64(weights.k_norm), qk_norm) for k in ks]
    sinks = _f64(weights.sinks)
    if rope is not None:
        qs = [rotate(q, rope, S - T) for q in qs]
        ks = [rotate(k, rope, 0) for k in ks]
    vis = visible_keys(B, H, T, S, mask=mask, key_mask=key_mask, causal=causal, window=window,
                       causal_align=causal_align)
    add = additive(B, H, T, S, mask)
    Wo = _f64(weights.o_weight)
    hm = None if head_mask is None else np.broadcast_to(np.asarray(head_mask, np.float64).reshape(-1, H), (B, H))
    out = np.zeros((B, T, E))
    P = np.zeros((B, H, T, S))
    for b in range(B):
        for h in range(H):
            g = h // group  # the key/value head that query head h reads
            ctx = np.zeros((T, D))
            for i in range(T):
                seen = np.flatnonzero(vis[b, h, i])
                if seen.size == 0 and empty_row == "mean_value":  # uniform over every key
                    P[b, h, i] = 1.0 / S
                    ctx[i] = vs[g][b].mean(axis=0)
                    continue
                if seen.size == 0:  # no visible key: zero weights, zero context (or NaN)
                    if empty_row in ("nan", "unspecified"):
                        P[b, h, i] = np.nan
                        ctx[i] = np.nan
                    continue
                z = _capped(scale, qs[h][b, i], ks[g][b][seen], add[b, h, i, seen], softcap)
                top = z.max() if sinks is None else max(z.max(), sinks[h])
                e = np.exp(z - top)
                p = e / (e.sum() + (0.0 if sinks is None else math.exp(sinks[h] - top)))
                P[b, h, i, seen] = p
                ctx[i] = p @ vs[g][b, seen]
            if hm is not None:
                ctx = ctx * hm[b, h]
            out[b] += ctx @ Wo[:, h * D:(h + 1) * D].T
    if weights.o_bias is not None:
        out += _f64(weights.o_bias)
    return out, P
