r"""The reference multi-head attention, written once against an array namespace ``xp``.

``xp`` is ``numpy`` or ``mlx.core``; nothing here knows which. Both backends run this code for the
readable path (weights requested, dropout) and test their fast paths against it.

.. math::

    \mathrm{MHA}(X_q, X_k, X_v) = \mathrm{concat}_h\big(P_h V_h\big) W_O^\top + b_O,\qquad
    P_h = \mathrm{softmax}_{\text{visible}}\!\big(s\, Q_h K_{g(h)}^\top + A\big)

where :math:`Q = X_q W_q^\top + b_q` is split into H heads of width D (head h owns columns
``h*D:(h+1)*D``), :math:`K, V` likewise into :math:`H_{kv}` heads, :math:`g(h) = \lfloor h / (H/H_{kv})
\rfloor` is the key/value head that query head h reads (GQA), :math:`s` the scale (default
:math:`1/\sqrt{D}`) and :math:`A` the additive mask. The softmax runs over the keys each query may see
(mask AND key_mask AND causal), max-subtracted, in float32 or wider; a query that sees no key gets
all-zero weights and a zero context, so its output is :math:`b_O`.

Non-finite numbers: a NaN or inf at a key or value position that a query may not see never reaches that
query's output; one that it may see makes its context non-finite (NaN).
"""

from __future__ import annotations

import math

from ._rope import apply_rope

NEG_INF = float("-inf")


def linear(xp, x, weight, bias):
    """``x @ weight.T + bias``: (..., in) -> (..., out), torch/MLX ``Linear`` layout."""
    y = xp.matmul(x, weight.T)
    return y if bias is None else y + bias


def split_heads(x, num_heads: int):
    """(B, L, H*D) -> (B, H, L, D)."""
    B, L, HD = x.shape
    return x.reshape(B, L, num_heads, HD // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, L, D) -> (B, L, H*D)."""
    B, H, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * D)


def group_queries(x, num_kv_heads: int):
    """(B, H, T, ...) -> (B, Hkv, G, T, ...): query head h = kv * G + r reads key/value head kv."""
    B, H = x.shape[:2]
    return x.reshape((B, num_kv_heads, H // num_kv_heads) + tuple(x.shape[2:]))


def masked_softmax(xp, logits, keep, factor=1.0):
    """Softmax over the last axis restricted to ``keep``; rows with nothing visible give zeros.

    ``logits`` (B, H, T, S) in the accumulation dtype, divided by ``factor`` (a power of two; see
    :func:`logit_factor`): the weights are those of logits * factor. ``keep`` bool broadcastable to the
    logits, or None. Max-subtracted. NaN logits at visible positions make their row NaN; hidden ones are
    ignored. Returns ``(weights, lse)``: lse (B, H, T) is log sum_j exp(logits_ij) over the visible j
    (-inf for a query that sees nothing), with which any weight can be recomputed as exp(logit - lse).
    """
    if keep is not None:
        logits = xp.where(keep, logits, NEG_INF)  # (B, H, T, S)
    m = xp.max(logits, axis=-1, keepdims=True)  # (B, H, T, 1)
    m = xp.where(m == NEG_INF, 0.0, m)  # empty rows: keep exp(-inf - m) = 0 well defined
    e = xp.exp((logits - m) * factor)  # hidden -> exactly 0
    denom = xp.sum(e, axis=-1, keepdims=True)
    safe = xp.where(denom == 0, 1.0, denom)
    lse = xp.where(denom == 0, NEG_INF, xp.log(safe) + m * factor)[..., 0]
    return e / safe, lse


def logit_factor(xp, q, k, scale: float):
    """c >= 1, a power of two, such that the logits divided by c cannot leave the accumulation dtype's
    range: 1 unless scale * max|q| * max|k| * D could pass 2^100 (inputs around 1e19 for float32), so that
    finite inputs never give NaN rows of our own making. A 0-d array of q's dtype (no host sync)."""
    if 0 in tuple(q.shape) or 0 in tuple(k.shape):  # nothing to attend (B = 0)
        return 1.0

    def log2_top(x):  # log2 max|x| over its finite entries (-inf for none), itself never overflowing
        return xp.log2(xp.max(xp.abs(xp.where(xp.isfinite(x), x, 0))))

    excess = log2_top(q) + log2_top(k) + math.log2(abs(scale) * q.shape[-1] + 1e-300) - 100.0
    return (2.0 ** xp.ceil(xp.maximum(excess, 0.0))).astype(q.dtype)


def nonfinite_keys(xp, *arrays):
    """(B, Hkv, S) bool: True where any of the (B, Hkv, S, D) ``arrays`` is non-finite at that key."""
    bad = None
    for a in arrays:
        b = xp.logical_not(xp.all(xp.isfinite(a), axis=-1))
        bad = b if bad is None else xp.logical_or(bad, b)
    return bad


def attention(xp, q, k, v, *, scale: float, keep=None, bias=None, dropout=None, acc_dtype=None):
    """Scaled dot-product attention over heads; returns ``(context, weights, lse)``.

    Args:
        q: (B, H, T, D) queries.
        k, v: (B, Hkv, S, D) keys and values; H must be a multiple of Hkv (GQA).
        scale: multiplies the logits.
        keep: bool broadcastable to (B, H, T, S), True = may attend; None = all visible.
        bias: float broadcastable to (B, H, T, S), finite, added to the logits.
        dropout: multiplier broadcastable to (B, H, T, S) applied to the weights (already divided
            by the keep probability), or None.
        acc_dtype: dtype of the logits and softmax (float32 or wider); default: that of ``q``.

    Returns:
        context (B, H, T, D) in the dtype of ``v``; weights (B, H, T, S) in ``acc_dtype``; lse (B, H, T),
        the log-sum-exp of each query's visible logits (-inf when it sees none).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = acc_dtype if acc_dtype is not None else q.dtype
    qg = group_queries(q, Hkv).astype(acc)  # (B, Hkv, G, T, D)
    kt = xp.swapaxes(k, -1, -2).astype(acc)[:, :, None]  # (B, Hkv, 1, D, S)
    c = logit_factor(xp, qg, kt, scale)  # 1, or what keeps the logits / c within range (exact: a power of 2)
    logits = (xp.matmul(qg / c, kt) * scale).reshape(B, H, T, S)  # (B, H, T, S), divided by c
    if bias is not None:
        logits = logits + bias / c
    weights, lse = masked_softmax(xp, logits, keep, c)  # (B, H, T, S), (B, H, T)
    if dropout is not None:
        weights = weights * dropout

    # Values: a non-finite value row must not leak into queries that cannot see it (0 * NaN = NaN),
    # so it is zeroed and the rows that can see it are set to NaN afterwards.
    bad = nonfinite_keys(xp, v)  # (B, Hkv, S)
    v_clean = xp.where(bad[..., None], 0.0, v).astype(acc)
    ctx = xp.matmul(group_queries(weights, Hkv), v_clean[:, :, None])  # (B, Hkv, G, T, D)
    ctx = ctx.reshape(B, H, T, D)
    sees_bad = xp.repeat(bad, H // Hkv, axis=1)[:, :, None, :]  # (B, H, 1, S), head h -> h // G
    if keep is not None:
        sees_bad = xp.logical_and(sees_bad, keep)
    touched = xp.any(sees_bad, axis=-1, keepdims=True)  # (B, H, T or 1, 1)
    ctx = xp.where(touched, float("nan"), ctx)
    return ctx.astype(v.dtype), weights, lse


def multi_head_attention(xp, query, key, value, params, *, num_heads: int, num_kv_heads: int,
                         scale: float, masks=None, head_mask=None, dropout=None, acc_dtype=None, rope=None,
                         q_offset: int = 0, k_offset: int = 0, kv_step=None):
    """The whole layer: projections, heads, RoPE, the cache, attention, concatenation, output projection.

    Args:
        query: (B, T, E); key: (B, S, kdim); value: (B, S, vdim).
        params: mapping with ``q_weight`` (H*D, E), ``k_weight`` (Hkv*D, kdim), ``v_weight``
            (Hkv*D, vdim), ``o_weight`` (E, H*D) and the matching ``*_bias`` (or None).
        masks: a :class:`mha._masks.MaskSet` or None.
        head_mask: multipliers broadcastable to (B, H, 1, 1) on each head's context, or None.
        rope: an :class:`mha.RoPE` rotating queries from position ``q_offset`` on and keys from
            ``k_offset`` on (mha._rope), or None.
        kv_step: a cache's step (mha._cache): the new keys and values are appended to the cache and
            the attention runs over all it keeps; or None.

    Returns:
        output (B, T, E), weights (B, H, T, S) and lse (B, H, T).
    """
    q = split_heads(linear(xp, query, params["q_weight"], params["q_bias"]), num_heads)  # (B, H, T, D)
    k = split_heads(linear(xp, key, params["k_weight"], params["k_bias"]), num_kv_heads)  # (B, Hkv, S, D)
    v = split_heads(linear(xp, value, params["v_weight"], params["v_bias"]), num_kv_heads)
    if rope is not None:
        q = apply_rope(xp, q, rope, q_offset, acc_dtype)
        k = apply_rope(xp, k, rope, k_offset, acc_dtype)
    if kv_step is not None:
        k, v = kv_step.append(k, v)  # (B, Hkv, S, D): the kept positions, the new ones last
    keep = bias = None
    if masks is not None:
        keep, bias = masks.full_keep(xp), masks.bias
    ctx, weights, lse = attention(xp, q, k, v, scale=scale, keep=keep, bias=bias, dropout=dropout,
                                  acc_dtype=acc_dtype)  # (B, H, T, D), (B, H, T, S), (B, H, T)
    if head_mask is not None:
        ctx = ctx * head_mask
    out = linear(xp, merge_heads(ctx), params["o_weight"], params["o_bias"])  # (B, T, E)
    return out, weights, lse
