r"""Blockwise attention on MLX, for calls whose score matrix would not fit a memory budget.

MLX's CPU device has no fused attention kernel: ``mx.fast.scaled_dot_product_attention`` falls back
to matmul, softmax, matmul and holds the whole (B, H, T, S) score matrix (docs/performance.md: what
that costs, and where it fails). When that matrix would exceed
``mha_mlx.options.score_bytes``, :mod:`mha_mlx._layer` runs this path instead: blocks of ``block_q``
queries against blocks of ``block_k`` keys with FlashAttention's online softmax, in float32 whatever
the input dtype,

.. math::

    m' = \max(m, \max_j s_j),\quad \ell' = \ell\,e^{m - m'} + \sum_j e^{s_j - m'},\quad
    a' = a\,e^{m - m'} + \sum_j e^{s_j - m'} v_j,\qquad \mathrm{context} = a / \ell,

where :math:`s_j` are the block's logits (scale, additive mask; hidden keys :math:`-\infty`). The
running state is evaluated after each key block, so memory is a few blocks of logits plus O(T x E) for
the projections, never O(T x S). Key blocks that the causal or window rule hides from every query of a
query block are skipped.

The project's rules hold as on the fused path: every mask combines by AND (causal aligned at the end,
window, key_mask); a query with no visible key gets a zero context and lse -inf (``l`` stays 0); a key
whose key or value holds NaN/inf has its value zeroed (so ``0 * value`` stays 0 for the rows that
cannot see it; its logit is -inf there) and makes the context of exactly the rows that can see it NaN,
while lse stays the log-sum-exp of the logits, as the reference computes them.
"""

from __future__ import annotations

import mlx.core as mx

from mha._reference import group_queries

from . import _nonfinite
from ._options import options
from ._range import scaled_queries, times_pow2

NEG_INF = float("-inf")
BLOCK_BYTES = 4 << 20  # target size of one block of float32 logits, all (batch, head) pairs together


def over_budget(B: int, H: int, T: int, S: int) -> bool:
    """Whether a call with these sizes runs blockwise (``mha_mlx.options``: score_bytes, gpu)."""
    o = options
    if o.score_bytes is None or (not o.gpu and mx.default_device() != mx.cpu):
        return False
    return 4 * B * H * T * S > o.score_bytes


def _block_sizes(B: int, H: int, T: int, S: int) -> tuple[int, int]:
    o = options
    bk = o.block_k or max(1, min(S, 1024, BLOCK_BYTES // (4 * B * H)))
    bq = o.block_q or max(1, min(T, BLOCK_BYTES // (4 * B * H * bk)))
    return bq, bk


def attention(q, k, v, *, scale: float, masks, softcap=None, sinks=None, return_lse: bool = False):
    """Attention over key blocks with an online softmax; the same result as the fused path.

    Args:
        q: (B, H, T, D) queries; k, v: (B, Hkv, S, D) keys and values (after RoPE and the cache).
        scale: multiplies the logits.
        masks: the call's :class:`mha._masks.MaskSet` over (B, H, T, S).
        softcap: c: each logit l becomes c * tanh(l / c) before the additive mask (Gemma 2); None: off.
        sinks: (H,) sink logits: exp(sink_h) joins each row's denominator, with no value; None: off.
        return_lse: also return the log-sum-exp of each query's visible logits (and its sink).

    Returns:
        context (B, T, H, D) in v's dtype (the layout of the output projection's input), and lse
        (B, H, T) float32 (-inf for a query that sees no key and has no sink) or None.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    f32 = mx.float32
    bad, top = _nonfinite.scan(k, v)  # (B, Hkv, S): NaN/inf in the key or the value; max |k| of the others
    # as in the reference: its value is zeroed (a zero weight times it stays 0) and the rows that see it
    # are set to NaN at the end; k and v as contiguous float32 once, O(S x D)
    k = mx.contiguous(k.astype(f32))  # (B, Hkv, S, D)
    q, e = scaled_queries(q.astype(f32), top, scale)  # q * scale / 2^e: logits in units of 2^e (e = 0 but at
    v_dtype, v = v.dtype, mx.contiguous(mx.where(bad[..., None], 0, v).astype(f32))  # float32's edge)
    qg = group_queries(q, Hkv)  # (B, Hkv, G, T, D)
    rules = _Rules(softcap, e, None if sinks is None else _sink_units(sinks, e, Hkv))
    bq, bk = _block_sizes(B, H, T, S)
    ctx, lse = [], []
    for t0 in range(0, T, bq):
        t1 = min(T, t0 + bq)
        c_, l_ = _query_block(mx.contiguous(qg[:, :, :, t0:t1]), k, v, bad[:, :, None, None, :], masks, rules,
                              t0, t1, bk)
        ctx.append(c_.reshape(B, H, t1 - t0, D))
        lse.append(l_.reshape(B, H, t1 - t0))
    ctx = mx.concatenate(ctx, axis=2) if len(ctx) > 1 else ctx[0]  # (B, H, T, D)
    out_lse = None
    if return_lse:  # in units of 1: times 2^e unless a softcap brought the logits back to them
        out_lse = mx.concatenate(lse, axis=2) if len(lse) > 1 else lse[0]
        if softcap is None:
            out_lse = mx.where(out_lse == 0, 0.0, times_pow2(out_lse, e))
    return ctx.astype(v_dtype).swapaxes(1, 2), out_lse


class _Rules:
    """What turns a block's raw logits (units of 2^e) into the softmax's: the softcap and the sinks."""

    def __init__(self, softcap, e, sinks):
        self.softcap, self.e, self.sinks = softcap, e, sinks  # sinks (1, Hkv, G, 1, 1) in the logits' units

    def logits(self, s):
        """Raw logits s (units of 2^e) to the softmax's units: c tanh(l / c) (units of 1) with a softcap."""
        if self.softcap is None:
            return s
        return self.softcap * mx.tanh(times_pow2(s, self.e) / self.softcap)  # +-inf past the range: +-c


def _sink_units(sinks, e, Hkv: int):
    """(H,) sink logits as (1, Hkv, G, 1, 1) float32, in the logits' units (2^e without a softcap)."""
    s = mx.array(sinks).astype(mx.float32) if not isinstance(sinks, mx.array) else sinks.astype(mx.float32)
    return times_pow2(s, -e).reshape(1, Hkv, -1, 1, 1)


def _query_block(qb, k, v, bad, masks, rules, t0, t1, bk):
    """One block of scaled float32 queries qb (B, Hkv, G, tb, D) against its keys (k, v float32
    (B, Hkv, S, D), ``bad`` (B, Hkv, 1, 1, S) their NaN/inf flags): context (B, Hkv, G, tb, D), NaN
    where a visible key is bad, and lse (B, Hkv, G, tb), float32.

    The running state is evaluated after each key block (see :func:`_evaluate`).
    """
    B, Hkv, G, tb, D = qb.shape
    lo, hi = masks.key_span(t0, t1)
    m = mx.full((B, Hkv, G, tb, 1), NEG_INF, mx.float32)  # running max, sum, context, sees a bad key
    l_, acc, touched = mx.zeros_like(m), mx.zeros(qb.shape, mx.float32), mx.zeros(m.shape, mx.bool_)
    for s0 in range(lo, hi, bk):
        s1 = min(hi, s0 + bk)
        s, keep = _logits(qb, k, masks.cut(rows=(t0, t1), cols=(s0, s1)), rules, s0, s1)  # (B, Hkv, G, tb, sb)
        hit = bad[..., s0:s1] if keep is None else mx.logical_and(keep, bad[..., s0:s1])
        touched = mx.logical_or(touched, mx.any(hit, axis=-1, keepdims=True))  # sees a bad key here
        m_new = mx.maximum(m, mx.max(s, axis=-1, keepdims=True))
        m_use = mx.where(m_new == NEG_INF, 0.0, m_new)  # a row with nothing visible yet: exp(-inf) = 0
        p = mx.exp(s - m_use)
        alpha = mx.exp(m - m_use)
        l_ = l_ * alpha + p.sum(axis=-1, keepdims=True)
        acc = acc * alpha + mx.matmul(p, v[:, :, None, s0:s1])  # (B, Hkv, G, tb, D)
        m = m_new
        _evaluate(m, l_, acc, touched)
    if rules.sinks is not None:  # one more term exp(sink) in the denominator, with no value
        m_new = mx.maximum(m, rules.sinks)
        alpha = mx.exp(m - m_new)
        l_, acc, m = l_ * alpha + mx.exp(rules.sinks - m_new), acc * alpha, m_new
    empty = l_ == 0  # (B, Hkv, G, tb, 1): no visible key (and no sink)
    ctx = mx.where(touched, float("nan"), acc / mx.where(empty, 1.0, l_))
    lse = mx.log(l_) + m  # an empty row: log 0 + (-inf) = -inf
    return ctx, lse[..., 0]


def _evaluate(*arrays) -> None:
    """Evaluate the running state now, so that one key block's logits at a time exist. Left lazy, MLX
    evaluates the whole graph breadth first and computes many blocks' logits before it consumes them (a
    peak near half the score matrix; docs/performance.md). Inside mx.compile nothing may be evaluated:
    there the blocks stay lazy."""
    try:
        mx.eval(*arrays)
    except ValueError as err:
        if "transformation" not in str(err):
            raise


def _logits(qb, k, block, rules, s0, s1):
    """(B, Hkv, G, tb, sb) float32 logits of a block of queries and keys s0..s1 (``block``: the MaskSet cut
    to them), -inf where hidden, and which keys they see (bool, broadcastable to the logits; None: all)."""
    s = mx.matmul(qb, k[:, :, None, s0:s1].swapaxes(-1, -2))  # (B, Hkv, G, tb, D) @ (B, Hkv, 1, D, sb)
    s = rules.logits(s)
    Hkv = k.shape[1]
    if block.bias is not None:  # in the logits' units: 2^e, unless a softcap brought them back to 1
        s = s + _grouped(block.bias if rules.softcap is not None else times_pow2(block.bias, -rules.e), Hkv)
    keep = block.visible(mx)  # (b, h, tb, sb) or None
    if keep is None:
        return s, None
    keep = _grouped(keep, Hkv)
    return mx.where(keep, s, NEG_INF), keep


def _grouped(a, Hkv: int):
    """(b, H or 1, t, s) -> (b, Hkv or 1, G or 1, t, s), query head h = kv * G + r (GQA)."""
    b, h, t, s = a.shape
    return a.reshape(b, Hkv, h // Hkv, t, s) if h > 1 else a.reshape(b, 1, 1, t, s)
