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

from .._reference import attention

NEG_INF = float("-inf")
TILE_ELEMENTS = 1 << 22  # a tile of scores holds at most this many floats (B * H * rows * S): 16 MiB in float32


def positional_keep(xp, qpos, kpos, causal: bool, window):
    """(T, S) bool from positions (T,) and (S,) (numpy ints), or None when nothing is hidden by them."""
    if not causal and window is None:
        return None
    dist = qpos[:, None] - kpos[None, :]  # (T, S) p - p'
    keep = dist >= 0 if causal else None
    if window is not None:
        w = abs(dist) < window
        keep = w if keep is None else keep & w
    return xp.array(keep) if xp.__name__ != "numpy" else keep


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


def block_attention(xp, q, k, v, *, scale, keep, bias, acc_dtype):
    """(context (B, H, T, D) in acc_dtype, lse (B, H, T)) of queries q (B, H, T, D) against one block
    k, v (B, Hkv, S, D), computed in tiles of query rows so that one tile of scores holds at most
    TILE_ELEMENTS floats. ``keep`` (bool) and ``bias`` (float) broadcast to (B, H, T, S), or None."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    rows = max(1, TILE_ELEMENTS // max(1, B * H * S))
    ctxs, lses = [], []
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        ctx, _, lse = attention(xp, q[:, :, t0:t1], k, v, scale=scale, keep=_rows(keep, t0, t1),
                                bias=_rows(bias, t0, t1), acc_dtype=acc_dtype)  # (B, H, t, D), (B, H, t)
        ctxs.append(ctx.astype(acc_dtype))
        lses.append(lse)
    if len(ctxs) == 1:
        return ctxs[0], lses[0]
    return xp.concatenate(ctxs, axis=2), xp.concatenate(lses, axis=2)


def _rows(x, t0: int, t1: int):
    """Rows t0..t1 of a (..., T or 1, S or 1) mask (4-D, broadcastable), or None."""
    if x is None or x.shape[-2] == 1:
        return x
    return x[..., t0:t1, :]


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
