r"""The arithmetic of ring attention, over an array namespace ``xp`` (numpy or mlx.core).

A rank's queries meet one key/value block at a time. Each block gives, per head and query, a context
:math:`c_b` (softmax-weighted mean of the block's values over the keys visible in it) and
:math:`\ell_b`, the log-sum-exp of those visible logits (:func:`mha._reference.attention` returns both).
Blocks merge exactly by

.. math::

    \ell = \log(e^{\ell_a} + e^{\ell_b}),\qquad c = e^{\ell_a - \ell} c_a + e^{\ell_b - \ell} c_b

(Liu et al., 2023, "Ring Attention with Blockwise Transformers"); a query that sees nothing in either
keeps :math:`\ell = -\infty` and :math:`c = 0`, so its output is the output bias, as the layer's.

Positions replace the layer's "aligned at the end" indices: query at position p and key at position p'
obey causal :math:`p' \le p` and window :math:`|p - p'| < W`. Shape letters: B batch, H heads, Hkv
key/value heads, T the rank's queries, S a block's keys, D head_dim.
"""

from __future__ import annotations

import numpy as np

from .._reference import attention

NEG_INF = float("-inf")
TILE_ELEMENTS = 1 << 20  # a tile of scores holds at most this many floats (B * H * rows * S): 4 MiB in float32


def positional_keep(xp, qpos, kpos, causal: bool, window):
    """(T, S) bool from positions (T,) and (S,) (numpy ints), or None when nothing is hidden by them."""
    if not causal and window is None:
        return None
    dist = qpos[:, None] - kpos[None, :]  # (T, S) p - p'
    keep = dist >= 0 if causal else None
    if window is not None:
        w = abs(dist) < window
        keep = w if keep is None else keep & w
    return keep if xp is np else xp.array(keep)


def block_hidden(qpos, kpos, causal: bool, window) -> bool:
    """Whether the positional rules hide every key of the block from every query (skip it)."""
    if len(qpos) == 0 or len(kpos) == 0:
        return True
    if causal and kpos.min() > qpos.max():  # wholly in the future
        return True
    if window is not None:
        gap = max(kpos.min() - qpos.max(), qpos.min() - kpos.max())  # smallest |p - p'| when the ranges are apart
        if gap >= window:
            return True
    return False


def key_span(qpos, kpos, causal: bool, window) -> tuple[int, int]:
    """[lo, hi): the block's keys that some query of ``qpos`` may see under the positional rules, from
    ascending key positions ``kpos`` (keys outside it are hidden from every one of these queries)."""
    lo, hi = 0, len(kpos)
    if len(qpos) == 0:
        return 0, 0
    if causal:
        hi = int(np.searchsorted(kpos, qpos.max(), side="right"))  # p' <= p
    if window is not None:
        lo = int(np.searchsorted(kpos, qpos.min() - window, side="right"))  # p' > p - W
        if not causal:
            hi = min(hi, int(np.searchsorted(kpos, qpos.max() + window - 1, side="right")))  # p' < p + W
    return lo, max(lo, hi)


def _all_visible(qpos, kpos, causal: bool, window) -> bool:
    """Whether the positional rules hide nothing between these queries and keys."""
    if causal and kpos.max() > qpos.min():
        return False
    if window is not None and max(qpos.max() - kpos.min(), kpos.max() - qpos.min()) >= window:
        return False
    return True


def block_attention(xp, q, k, v, qpos, kpos, *, causal: bool, window, scale, keep, bias, acc_dtype):
    """(context (B, H, T, D) in acc_dtype, lse (B, H, T)) of queries q (B, H, T, D) at positions ``qpos``
    against one block k, v (B, Hkv, S, D) at ascending positions ``kpos``, with the causal/window rules
    and ``keep`` (bool) / ``bias`` (float) broadcastable to (B, H, T, S), or None.

    Computed in tiles of query rows (one tile of scores holds at most TILE_ELEMENTS floats); each tile
    attends only to the span of keys its rules leave visible, with a positional mask only where the
    rules cut through that span."""
    B, H, T, D = q.shape
    S = k.shape[2]
    rows = max(1, TILE_ELEMENTS // max(1, B * H * S))
    ctxs, lses = [], []
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        qp = qpos[t0:t1]
        lo, hi = key_span(qp, kpos, causal, window)
        if lo == hi:  # nothing visible: zero context, lse -inf
            ctxs.append(xp.zeros((B, H, t1 - t0, D), dtype=acc_dtype))
            lses.append(xp.full((B, H, t1 - t0), NEG_INF, dtype=acc_dtype))
            continue
        kp = kpos[lo:hi]
        tile_keep = _tile(keep, t0, t1, lo, hi)
        if not _all_visible(qp, kp, causal, window):
            pk = positional_keep(xp, qp, kp, causal, window)  # (t, s)
            tile_keep = pk if tile_keep is None else xp.logical_and(tile_keep, pk)
        ctx, _, lse = attention(xp, q[:, :, t0:t1], k[:, :, lo:hi], v[:, :, lo:hi], scale=scale, keep=tile_keep,
                                bias=_tile(bias, t0, t1, lo, hi), acc_dtype=acc_dtype)  # (B, H, t, D), (B, H, t)
        ctxs.append(ctx.astype(acc_dtype))
        lses.append(lse)
    if not ctxs:
        return xp.zeros((B, H, 0, D), dtype=acc_dtype), xp.zeros((B, H, 0), dtype=acc_dtype)
    if len(ctxs) == 1:
        return ctxs[0], lses[0]
    return xp.concatenate(ctxs, axis=2), xp.concatenate(lses, axis=2)


def _tile(x, t0: int, t1: int, lo: int, hi: int):
    """Rows t0..t1 and columns lo..hi of a (..., T or 1, S or 1) mask (4-D, broadcastable), or None."""
    if x is None:
        return None
    if x.shape[-2] != 1:
        x = x[..., t0:t1, :]
    if x.shape[-1] != 1:
        x = x[..., lo:hi]
    return x


def merge(xp, acc, block):
    """Merge two (context (B, H, T, D), lse (B, H, T)) pairs by log-sum-exp (module docstring)."""
    if acc is None:
        return block
    (ca, la), (cb, lb) = acc, block
    lse = xp.logaddexp(la, lb)  # (B, H, T); -inf where both see nothing
    ref = xp.where(lse == NEG_INF, 0.0, lse)  # keeps exp(-inf - ref) = 0 and never -inf - -inf
    wa = xp.exp(la - ref)[..., None]  # (B, H, T, 1)
    wb = xp.exp(lb - ref)[..., None]
    return ca * wa + cb * wb, lse
