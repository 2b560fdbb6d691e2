"""The decode step: one new token per sequence against a KV cache, with nothing to mask.

Most calls of a generating model are this step, and its arithmetic is small (a few GEMVs and one pass
over the cached keys and values), so what the general kernel spends per call on planning blocks, leases
and the pool would dominate it. A call with nothing but the new tokens and the cache skips even the
front end's checks (:func:`lane`: ~39 us per call at E=16 where the checked route took ~84); the step
runs on the calling thread in a fixed sequence of numpy calls:

1. the fused Q/K/V projection of the new tokens (one (B, E) x (E, (H + 2 Hkv) D) GEMM), q pre-scaled;
2. RoPE on q and k when the layer has it, then k and v appended to the cache;
3. logits of each query head group against its key/value head: (B, Hkv, G, D) x (B, Hkv, D, S);
4. the softmax with the row maximum subtracted (every key is visible: see :func:`applies`);
5. the weighted sum of the values, divided by the row sums, head_mask, and the output projection.

It applies only when nothing can hide a key (no mask, no padding ever stored, T = 1 so the causal and
window rules keep every cached key) and no key or value ever stored holds NaN/inf; anything else takes
the general kernel. Logits past float32's range (|q.k| > 3.4e38) are recomputed from q and k scaled down
by powers of two, the factor multiplied back inside the exp, as the kernel does.

Threads: BLAS shares the GEMVs when that is faster, learnt per layer (mha_cpu._pool.BlasChoice).
Sharing the pass over the cache out over the project's own workers (by key/value heads) was measured slower at every
context from 512 to 4096 on this project's 2-core VM (1.13-1.28x): a Python pool's hand-off, a sleeping
thread woken, costs more than half the pass saves.
"""

from __future__ import annotations

import math

import numpy as np

from mha._cache import KVCache

from ._kernel import shrink_exponent
from ._pool import timed


def applies(call) -> bool:
    """Whether ``call`` (a prepared layer call on the fast route) is a plain decode step."""
    step, masks = call.pos.step, call.masks
    return (step is not None and masks.T == 1 and masks.keep is None and masks.bias is None
            and masks.window is None and step.cache.holds_nonfinite is False)


def lane(layer, query, cache):
    """The output of a decode step called with nothing but the new tokens and the cache (the layer's
    front door sends such calls here before any other work: :meth:`mha.MultiHeadAttention.__call__`),
    or None, with nothing changed, when the call is not a plain step of this layer with its own cache
    (the general path then checks everything and raises what it must) or its new keys or values hold
    NaN/inf (or sum past the float range). The checks here are the general path's, for this one form
    of call: query a native (B, 1, E) array of the layer's dtype; keys and values projected from E
    features (a cache is for self-attention); cache a KVCache made by this layer for B sequences, with
    room for one more token, no padding and no NaN/inf ever stored. Causal or not, with a window or
    not, a single new query sees every key the cache keeps (a window's cache keeps the last window - 1
    and the new one)."""
    c = layer.config
    if (type(query) is not np.ndarray or query.ndim != 3 or query.shape[1] != 1 or query.dtype != layer._dtype
            or query.shape[2] != c.embed_dim or c.kdim != c.embed_dim or c.vdim != c.embed_dim
            or type(cache) is not KVCache or cache._owner != layer._cache_owner()
            or cache.batch_size != query.shape[0] or cache._padded
            or cache._nonfinite is not False or (cache.max_length is not None and cache.offset >= cache.max_length)):
        return None
    plan = cache._plan(1, None)
    x = layer._as_input(query)[:, 0]  # C order: a Fortran-ordered token gives its C-ordered copy's bits
    found = timed(layer._decode_blas, _work(layer, plan), _core, layer, x, plan, None, False, False)
    return None if found is None else found[0]


def step(layer, call):
    """(output, weights, lse) of a decode step (:func:`applies`), or None, with the cache untouched, when
    the new keys or values hold NaN/inf (the general kernel then isolates them)."""
    step_ = call.pos.step
    return timed(layer._decode_blas, _work(layer, step_), _core, layer, call.query[:, 0], step_, call.head_mask,
                 call.return_weights, call.return_lse)


def _work(layer, plan) -> float:
    """A step's multiply-adds (the projections and the pass over the S keys): its times are compared per
    unit of this, since a step's time grows with the cache."""
    c = layer.config
    HD = c.num_heads * c.head_dim
    return float(plan.cache.batch_size * (c.embed_dim * (2 * HD + 2 * c.num_kv_heads * c.head_dim) + 2 * plan.S * HD))


def _core(layer, x, plan, head_mask, want_weights: bool, want_lse: bool):
    """The step (module docstring) for new tokens x (B, E) and the cache's ``plan`` (mha._cache._Step)."""
    c, proj = layer.config, layer._proj
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    B = x.shape[0]
    w, b = proj.forms[False]["qkv"]  # (E, (H + 2 Hkv) D)
    y = x @ w
    y += b
    kv = y[:, H * D:]
    if not math.isfinite(np.add.reduce(kv, axis=None)):  # NaN/inf (or a sum past the float range: the
        return None  # general path, which tells them apart)
    q = y[:, :H * D].reshape(B, H, 1, D)
    k = kv[:, :Hkv * D].reshape(B, Hkv, 1, D)
    v = kv[:, Hkv * D:].reshape(B, Hkv, 1, D)
    if c.rope is not None:
        offset = plan.offset
        q, k = layer._rope(q, offset), layer._rope(k, offset)
    keys, values = plan.append(k, v, True)  # (B, Hkv, S, D)
    q = q.reshape(B, Hkv, H // Hkv, D)
    s = q @ keys.transpose(0, 1, 3, 2)  # (B, Hkv, G, S)
    factor = proj.logit_scale
    m = np.maximum.reduce(s, axis=-1, keepdims=True)
    if not math.isfinite(np.add.reduce(m, axis=None)):  # overflow (or a NaN query, which stays NaN anyway)
        s, m, factor = _rescaled_logits(q, keys, D, factor)
    s -= m
    if factor != 1.0:
        s *= s.dtype.type(factor)
    np.exp(s, out=s)
    sums = np.add.reduce(s, axis=-1, keepdims=True)
    ctx = s @ values  # (B, Hkv, G, D)
    ctx /= sums
    if head_mask is not None:
        ctx = ctx.reshape(B, H, D)
        ctx *= head_mask.reshape(-1, H, 1)
    out = ctx.reshape(B, H * D) @ proj.o_weight_t
    if proj.o_bias is not None:
        out += proj.o_bias
    weights = lse = None
    if want_weights:
        s /= sums
        weights = s.reshape(B, H, 1, -1)
    if want_lse:
        lse = (m * m.dtype.type(factor) + np.log(sums)).reshape(B, H, 1)
    return out[:, None], weights, lse


def _rescaled_logits(q, keys, D: int, factor: float):
    """(logits, row max, factor) from q and keys scaled down by powers of two so that no logit leaves the
    float range (|q.k| <= 2^100); the true logit is logits * factor."""
    p = [shrink_exponent(a, D) for a in (q, keys)]
    s = (q * q.dtype.type(math.ldexp(1.0, -p[0]))) @ (keys * keys.dtype.type(math.ldexp(1.0, -p[1]))).transpose(0, 1, 3, 2)
    return s, s.max(axis=-1, keepdims=True), factor * math.ldexp(1.0, p[0] + p[1])
