"""The numpy attention core: ``attend(q, k, v, masks, ...)`` on projected, head-split arrays (the seam of
docs/architecture.md). First form: it runs today's blockwise kernel (mha_cpu._kernel); softcap, sinks and
dropout take the reference's arithmetic until the kernel is rebuilt with them."""

from __future__ import annotations

import math

import numpy as np

from mha import _reference

from . import _kernel, _nonfinite
from ._pool import Workers


def attend(q, k, v, masks, *, scale: float, softcap=None, sinks=None, dropout=None, return_weights: bool = False):
    """(context (B, H, T, D), lse (B, H, T)[, weights (B, H, T, S)]) as :func:`mha.reference.attend` defines
    them: q (B, H, T, D), k and v (B, Hkv, S, D), numpy float32 or float64; ``masks`` a MaskSet over
    (B, H, T, S)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dt = q.dtype
    if softcap is not None or sinks is not None or dropout is not None or T == 0 or S == 0:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return _reference.attend(np, q, k, v, masks, scale=scale, softcap=softcap, sinks=sinks, dropout=dropout,
                                     return_weights=return_weights)
    qt = np.ascontiguousarray((q * dt.type(scale)).transpose(0, 2, 1, 3))  # (B, T, H, D), scaled
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, S, Hkv, D) views
    out = np.empty((B, T, H, D), dt)
    weights = np.empty((B, H, T, S), dt) if return_weights else None
    lse = np.empty((B, H, T), dt)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        poison = None
        if not (np.isfinite(kt).all() and np.isfinite(vt).all()):
            kt, vt, bad_k, bad_v = _nonfinite.zero_nonfinite(kt, vt, False, own=False)
            poison = _nonfinite.poisoned_rows(bad_k, bad_v, masks, H // Hkv)
        flops = 4.0 * B * T * S * H * D
        with Workers(flops) as workers:
            try:
                _kernel.attention(_kernel.Call(qt, kt, vt, D, masks, out, weights, lse, None, poison), workers)
            except _kernel.Overflow:  # logits past the dtype's range: q and k scaled down, every row again
                p = [_kernel.shrink_exponent(a, D) for a in (qt, kt)]
                qs = qt * dt.type(math.ldexp(1.0, -p[0]))
                ks = kt * dt.type(math.ldexp(1.0, -p[1]))
                call = _kernel.Call(qs, ks, vt, D, masks, out, weights, lse, None, poison,
                                    logit_scale=math.ldexp(1.0, p[0] + p[1]))
                _kernel.attention(call, workers)
    ctx = out.transpose(0, 2, 1, 3)  # (B, H, T, D) view
    return (ctx, lse, weights) if return_weights else (ctx, lse)
