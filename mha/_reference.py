r"""The reference multi-head attention, written once against an array namespace ``xp``.

``xp`` is ``numpy`` or ``mlx.core``; nothing here knows which. Both backends run this code for the
readable path (dropout; MLX: weights) and test their fast paths against it.

.. math::

    \mathrm{MHA}(X_q, X_k, X_v) = \mathrm{concat}_h\big(P_h V_{g(h)}\big) W_O^\top + b_O,\qquad
    P_h = \mathrm{softmax}_{\text{visible}}\!\big(\mathrm{cap}(s\, Q_h K_{g(h)}^\top) + A\big)

where :math:`Q = X_q W_q^\top + b_q` is split into H heads of width D (head h owns columns
``h*D:(h+1)*D``), :math:`K, V` likewise into :math:`H_{kv}` heads, :math:`g(h) = \lfloor h / (H/H_{kv})
\rfloor` is the key/value head that query head h reads (GQA), :math:`s` the scale (default
:math:`1/\sqrt{D}`), :math:`\mathrm{cap}(l) = c \tanh(l / c)` the optional soft-cap (Gemma 2; identity
without one) and :math:`A` the additive mask. Q and K may be RMS-normalised per head first (``qk_norm``)
and rotated (RoPE). The softmax runs over the keys each query may see (:class:`mha._masks.MaskSet`),
max-subtracted, in float32 or wider; with learned sinks (gpt-oss) each head's row adds
:math:`e^{\mathrm{sink}_h}` to its denominator, so the weights sum to less than 1. A query that sees no
key gets all-zero weights and a zero context, so its output is :math:`b_O`.

:func:`attend` is the core every path calls (projected, head-split arrays); the logits of very large
q and k (or scale) are formed in units of a power of two (:func:`_shrink`), so finite inputs give
finite weights at every magnitude the dtype holds.

Non-finite numbers: a NaN or inf at a key or value position that a query may not see never reaches that
query's output; one that it may see makes its context non-finite (NaN).
"""

from __future__ import annotations

import math

from ._masks import MaskSet
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


def exponent_excess(xp, x, budget: int):
    """max(0, ceil(log2 max|x|) - budget) over x's finite entries: the power of two x must be divided by
    to stay within 2^budget. A host int; a 0-d array inside MLX transformations that forbid evaluation."""
    if x.size == 0:
        return 0
    top = xp.max(xp.abs(xp.where(xp.isfinite(x), x, 0)))
    e = xp.maximum(xp.ceil(xp.log2(xp.where(top > 0, top, 1.0))) - budget, 0)
    try:
        return int(e)
    except (RuntimeError, ValueError) as err:  # mx.compile: no evaluation, the factors stay arrays
        if "transformation" not in str(err):
            raise
        return e


def _pow2_factors(xp, e, dtype) -> list:
    """Powers of two, each within float32's range, whose product is 2^e (e >= 0): [] for e = 0."""
    if isinstance(e, int):
        return [math.ldexp(1.0, min(e - c, 100)) for c in range(0, e, 100)]
    return [(2.0 ** xp.clip(e - c, 0, 100)).astype(dtype) for c in range(0, 3000 if dtype == "float64" else 300, 100)]


def _shrink(xp, q, k, scale: float, acc):
    """(q', k', factors): q' = q * scale / F_q and k' = k / F_k with F_q, F_k powers of two chosen so that
    |q' . k'| stays far inside the accumulation dtype's range (|q'|, |k'| <= 2^45, the scale's exponent
    above 2^20 moved into the factors), and ``factors`` powers of two whose product F is what the logits
    lost: true logit = (q' . k') * F. There are none unless the inputs are that large (q, k beyond
    2^45 ~ 3.5e13, or a scale beyond 2^20), so ordinary calls run the plain arithmetic. Applied one at a
    time, the factors never leave the dtype's range where the result stays in it: finite inputs give
    finite weights at every magnitude."""
    e_s = max(0, math.frexp(abs(scale))[1] - 20) if scale != 0 and math.isfinite(scale) else 0
    e_q, e_k = exponent_excess(xp, q, 45), exponent_excess(xp, k, 45)
    for f in _pow2_factors(xp, e_q, acc):
        q = q / f
    for f in _pow2_factors(xp, e_k, acc):
        k = k / f
    return q * math.ldexp(scale, -e_s), k, _pow2_factors(xp, e_q + e_k + e_s, acc)


def _times(x, factors):
    """x multiplied by each factor in turn (an overflow saturates to +-inf, never to NaN: 0 stays 0)."""
    for f in factors:
        x = x * f
    return x


def _over(x, factors):
    for f in factors:
        x = x / f
    return x


def masked_softmax(xp, logits, keep, factors=()):
    """Softmax over the last axis restricted to ``keep``; rows with nothing visible give zeros.

    ``logits`` (B, H, T, S) in the accumulation dtype, in units of F = the product of ``factors`` (see
    :func:`_shrink`): the weights are those of logits * F. ``keep`` bool broadcastable to the logits, or
    None. Max-subtracted. NaN logits at visible positions make their row NaN; hidden ones are ignored.
    Returns ``(weights, lse)``: lse (B, H, T) is log sum_j exp(F logits_ij) over the visible j (-inf for
    a query that sees nothing; +inf past the dtype's range).
    """
    if keep is not None:
        logits = xp.where(keep, logits, NEG_INF)  # (B, H, T, S)
    m = xp.max(logits, axis=-1, keepdims=True) if logits.shape[-1] else xp.zeros(tuple(logits.shape[:-1]) + (1,))
    m = xp.where(m == NEG_INF, 0.0, m)  # empty rows (and no key at all): keep exp(-inf - m) = 0 well defined
    e = xp.exp(_times(logits - m, factors))  # hidden -> exactly 0
    denom = xp.sum(e, axis=-1, keepdims=True)
    safe = xp.where(denom == 0, 1.0, denom)
    lse = xp.where(denom == 0, NEG_INF, xp.log(safe) + _times(m, factors))[..., 0]
    return e / safe, lse


def with_sinks(xp, lse, sinks):
    """(lse, r): the log-sum-exp with each head's sink term exp(sink_h) added to its rows' denominators,
    and r = exp(lse_visible - lse) (B, H, T, 1), the share of the visible keys, by which weights and
    context are multiplied. lse (B, H, T) of the visible logits; sinks (H,)."""
    sink = xp.broadcast_to(sinks.astype(lse.dtype)[:, None], lse.shape)  # (B, H, T)
    top = xp.maximum(lse, sink)  # finite: the sink is
    total = top + xp.log(xp.exp(lse - top) + xp.exp(sink - top))
    total = xp.where(lse == float("inf"), lse, total)  # visible logits past the dtype's range: no sink share
    r = xp.where(lse == NEG_INF, 0.0, xp.exp(xp.where(lse == float("inf"), 0.0, lse - total)))
    return total, r[..., None].astype(lse.dtype)


def nonfinite_keys(xp, *arrays):
    """(B, Hkv, S) bool: True where any of the (B, Hkv, S, D) ``arrays`` is non-finite at that key."""
    bad = None
    for a in arrays:
        b = xp.logical_not(xp.all(xp.isfinite(a), axis=-1))
        bad = b if bad is None else xp.logical_or(bad, b)
    return bad


def attend(xp, q, k, v, masks, *, scale: float, softcap=None, sinks=None, dropout=None,
           return_weights: bool = False, acc_dtype=None):
    """The attention core on projected, head-split arrays: ``(context, lse)`` or ``(context, lse, weights)``.

    Args:
        q: (B, H, T, D) queries (after RoPE and q/k norm).
        k, v: (B, Hkv, S, D) keys and values; H a multiple of Hkv (GQA: head h reads kv head h // (H / Hkv)).
        masks: a :class:`mha._masks.MaskSet` over (B, H, T, S): keep, bias, causal, window, positions.
        scale: multiplies q . k.
        softcap: c > 0: logits l become c * tanh(l / c) before the additive mask (Gemma 2); None: off.
        sinks: (H,) learned sink logits (gpt-oss): exp(sink_h) joins each row's denominator, with no value.
        dropout: multiplier broadcastable to (B, H, T, S) on the weights (already divided by the keep
            probability), or None.
        acc_dtype: dtype of the logits and softmax (float32 or wider); default: that of ``q``.

    Returns:
        context (B, H, T, D) in v's dtype; lse (B, H, T) = log(sum_visible exp(l_ij) [+ exp(sink_h)]),
        -inf for a row that sees no key (the sink without a visible key); weights (B, H, T, S) in
        ``acc_dtype``, exp(l_ij - lse_i) on visible keys and 0 elsewhere (they sum to 1 - the sink's
        share). A row that sees no key has context 0. NaN or inf at a key or value makes the context of
        exactly the rows that see it NaN (and, at a key, their weights and lse).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = acc_dtype if acc_dtype is not None else q.dtype
    qg = group_queries(q, Hkv).astype(acc)  # (B, Hkv, G, T, D)
    kt = xp.swapaxes(k, -1, -2).astype(acc)[:, :, None]  # (B, Hkv, 1, D, S)
    qg, kt, factors = _shrink(xp, qg, kt, scale, acc)  # logits in units of F = prod(factors)
    logits = xp.matmul(qg, kt).reshape(B, H, T, S)  # (B, H, T, S), scaled
    if softcap is not None:  # on the true logits (+-inf past the range caps to +-c), then units of 1
        logits = softcap * xp.tanh(_times(logits, factors) / softcap)
        factors = []
    if masks.bias is not None:
        logits = logits + _over(masks.bias.astype(acc), factors)
    keep = masks.visible(xp)
    weights, lse = masked_softmax(xp, logits, keep, factors)  # (B, H, T, S), (B, H, T)
    if sinks is not None:
        lse, r = with_sinks(xp, lse, sinks)
        weights = weights * r
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
    ctx = xp.where(touched, float("nan"), ctx).astype(v.dtype)
    return (ctx, lse, weights) if return_weights else (ctx, lse)


def attention(xp, q, k, v, *, scale: float, keep=None, bias=None, dropout=None, acc_dtype=None):
    """``(context, weights, lse)`` of :func:`attend` with keep/bias arrays and no positional rule (the
    ring's form until it takes a MaskSet)."""
    masks = MaskSet(keep, bias, q_pos=range(q.shape[2]), k_pos=range(k.shape[2]))
    ctx, lse, weights = attend(xp, q, k, v, masks, scale=scale, dropout=dropout, return_weights=True,
                               acc_dtype=acc_dtype)
    return ctx, weights, lse


def rms_norm(xp, x, weight, eps: float, acc_dtype=None):
    """RMSNorm over the last axis (D): x / sqrt(mean(x^2) + eps) * weight, in ``acc_dtype``, x's dtype out.
    x is scaled by a power of two near its largest entry first (exact), so no square overflows."""
    acc = x.dtype if acc_dtype is None else acc_dtype
    xa = x.astype(acc)
    top = xp.max(xp.abs(xa), axis=-1, keepdims=True)
    p = xp.where(top > 0, 2.0 ** xp.ceil(xp.log2(xp.where(top > 0, top, 1.0))), 1.0).astype(acc)
    y = xa / p
    y = y / xp.sqrt(xp.mean(y * y, axis=-1, keepdims=True) + eps / (p * p))
    return (y * weight.astype(acc)).astype(x.dtype)


def project_heads(xp, query, key, value, params, *, num_heads: int, num_kv_heads: int, qk_norm=None,
                  acc_dtype=None):
    """q (B, H, T, D), k, v (B, Hkv, S, D): the projections split into heads, q and k RMS-normalised over
    D with the weights ``q_norm``, ``k_norm`` when ``qk_norm`` (the epsilon) is given."""
    q = split_heads(linear(xp, query, params["q_weight"], params["q_bias"]), num_heads)  # (B, H, T, D)
    k = split_heads(linear(xp, key, params["k_weight"], params["k_bias"]), num_kv_heads)  # (B, Hkv, S, D)
    v = split_heads(linear(xp, value, params["v_weight"], params["v_bias"]), num_kv_heads)
    if qk_norm is not None:
        q = rms_norm(xp, q, params["q_norm"], qk_norm, acc_dtype)
        k = rms_norm(xp, k, params["k_norm"], qk_norm, acc_dtype)
    return q, k, v


def multi_head_attention(xp, query, key, value, params, *, num_heads: int, num_kv_heads: int,
                         scale: float, masks, head_mask=None, dropout=None, acc_dtype=None, rope=None,
                         q_offset: int = 0, k_offset: int = 0, kv_step=None, softcap=None, qk_norm=None,
                         return_weights: bool = True):
    """The whole layer: projections, q/k norm, RoPE, the cache, :func:`attend`, concatenation, W_O.

    Args:
        query: (B, T, E); key: (B, L, kdim); value: (B, L, vdim).
        params: mapping with ``q_weight`` (H*D, E), ``k_weight`` (Hkv*D, kdim), ``v_weight``
            (Hkv*D, vdim), ``o_weight`` (E, H*D), the matching ``*_bias`` (or None), and ``q_norm``,
            ``k_norm`` (D,) with ``qk_norm``, ``sinks`` (H,) or None.
        masks: the call's :class:`mha._masks.MaskSet` over (B, H, T, S).
        head_mask: multipliers broadcastable to (B, H, 1, 1) on each head's context, or None.
        rope: an :class:`mha.RoPE` rotating queries from position ``q_offset`` on and keys from
            ``k_offset`` on (mha._rope), or None.
        kv_step: a cache's step (mha._cache): the new keys and values are appended to the cache and
            the attention runs over all it keeps (S of them); or None (S = L).
        softcap, qk_norm: the layer's logit soft-cap and q/k RMSNorm epsilon, or None.

    Returns:
        output (B, T, E), weights (B, H, T, S) (None unless ``return_weights``) and lse (B, H, T).
    """
    q, k, v = project_heads(xp, query, key, value, params, num_heads=num_heads, num_kv_heads=num_kv_heads,
                            qk_norm=qk_norm, acc_dtype=acc_dtype)
    if rope is not None:
        q = apply_rope(xp, q, rope, q_offset, acc_dtype)
        k = apply_rope(xp, k, rope, k_offset, acc_dtype)
    if kv_step is not None:
        k, v = kv_step.append(k, v)  # (B, Hkv, S, D): the kept positions, in attended order
    ctx, lse, *weights = attend(xp, q, k, v, masks, scale=scale, softcap=softcap, sinks=params.get("sinks"),
                                dropout=dropout, return_weights=return_weights, acc_dtype=acc_dtype)
    if head_mask is not None:
        ctx = ctx * head_mask  # (B, H, T, D)
    out = linear(xp, merge_heads(ctx), params["o_weight"], params["o_bias"])  # (B, T, E)
    return out, (weights[0] if weights else None), lse
