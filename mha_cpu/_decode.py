"""The decode step: one new token per sequence against a KV cache, with nothing to mask.

Most calls of a generating model are this step, and its arithmetic is small (a few GEMVs and one pass
over the cached keys and values), so what the general kernel spends per call on planning blocks, leases
and the pool would dominate it. This path runs on the calling thread in a fixed sequence of numpy calls:

1. the fused Q/K/V projection of the new tokens (one (B, E) x (E, (H + 2 Hkv) D) GEMM), q pre-scaled;
2. RoPE on q and k when the layer has it, then k and v appended to the cache;
3. logits of each query head group against its key/value head: (B, Hkv, G, D) x (B, Hkv, D, S);
4. the softmax with the row maximum subtracted (every key is visible: see :func:`applies`);
5. the weighted sum of the values, divided by the row sums, head_mask, and the output projection.

It applies only when nothing can hide a key (no mask, no padding ever stored, T = 1 so the causal and
window rules keep every cached key) and no key or value ever stored holds NaN/inf; anything else takes
the general kernel. Logits past float32's range (|q.k| > 3.4e38) are recomputed from q and k scaled down
by powers of two, the factor multiplied back inside the exp, as the kernel does.
"""

from __future__ import annotations

import math

import numpy as np

from ._kernel import shrink_exponent


def applies(call) -> bool:
    """Whether ``call`` (a prepared layer call on the fast route) is a plain decode step."""
    step, masks = call.pos.step, call.masks
    return (step is not None and masks.T == 1 and masks.keep is None and masks.bias is None
            and masks.window is None and step.cache.holds_nonfinite is False)


def step(layer, call):
    """(output, weights, lse) of a decode step (:func:`applies`), or None, with the cache untouched, when
    the new keys or values hold NaN/inf (the general kernel then isolates them)."""
    c, proj = layer.config, layer._proj
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    x = call.query[:, 0]  # (B, E)
    B = x.shape[0]
    w, b = proj.forms[False]["qkv"]
    y = x @ w.T
    y += b
    kv = y[:, H * D:]
    if not np.isfinite(kv).all():
        return None
    q = y[:, :H * D].reshape(B, H, 1, D)
    k = kv[:, :Hkv * D].reshape(B, Hkv, 1, D)
    v = kv[:, Hkv * D:].reshape(B, Hkv, 1, D)
    if c.rope is not None:
        q, k = layer._rope(q, call.pos.q_offset), layer._rope(k, call.pos.k_offset)
    keys, values = call.pos.step.append(k, v, True)  # (B, Hkv, S, D)
    q = q.reshape(B, Hkv, H // Hkv, D)
    s = q @ keys.transpose(0, 1, 3, 2)  # (B, Hkv, G, S)
    factor = proj.logit_scale
    m = s.max(axis=-1, keepdims=True)
    if not np.isfinite(m).all():  # overflow (or a NaN query, which stays NaN either way)
        s, m, factor = _rescaled_logits(q, keys, D, factor)
    s -= m
    if factor != 1.0:
        s *= s.dtype.type(factor)
    np.exp(s, out=s)
    sums = s.sum(axis=-1, keepdims=True)
    ctx = s @ values  # (B, Hkv, G, D)
    ctx /= sums
    ctx = ctx.reshape(B, H, D)
    if call.head_mask is not None:
        ctx *= call.head_mask.reshape(-1, H, 1)
    out = ctx.reshape(B, H * D) @ proj.o_weight.T
    if proj.o_bias is not None:
        out += proj.o_bias
    weights = lse = None
    if call.return_weights:
        s /= sums
        weights = s.reshape(B, H, 1, -1)
    if call.return_lse:
        lse = (m * m.dtype.type(factor) + np.log(sums)).reshape(B, H, 1)
    return out[:, None], weights, lse


def _rescaled_logits(q, keys, D: int, factor: float):
    """(logits, row max, factor) from q and keys scaled down by powers of two so that no logit leaves the
    float range (|q.k| <= 2^100); the true logit is logits * factor."""
    p = [shrink_exponent(a, D) for a in (q, keys)]
    s = (q * q.dtype.type(math.ldexp(1.0, -p[0]))) @ (keys * keys.dtype.type(math.ldexp(1.0, -p[1]))).transpose(0, 1, 3, 2)
    return s, s.max(axis=-1, keepdims=True), factor * math.ldexp(1.0, p[0] + p[1])
