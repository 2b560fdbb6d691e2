r"""The arithmetic of ring attention, over an array namespace ``xp`` (numpy or mlx.core): one block's
call of the backend's core, and the merge of partial results by log-sum-exp.

A rank's queries meet one key/value block at a time. The backend's core (``layer._attend``, the same
function the layer calls) gives, per head and query, the block's context :math:`c_b` (softmax-weighted
mean of its visible values) and :math:`\ell_b`, the log-sum-exp of those visible logits. Blocks merge
exactly, as zhuzilin/ring-flash-attention's ``update_out_and_lse`` writes it, from the difference of
the two lse alone (no exp of a large number):

.. math::

    c = c_a + \sigma(\ell_b - \ell_a)\,(c_b - c_a),\qquad \ell = \log(e^{\ell_a} + e^{\ell_b})

(:math:`\sigma` the logistic function); a query that sees nothing in either keeps :math:`\ell = -\infty`
and :math:`c = 0`, so its output is the output bias, as the layer's.

Large additive masks. Float32 cannot hold :math:`\ell_b` precisely when the logits carry a mask term of
finfo(float32).min or -1e9 (what Hugging Face passes for padding): :math:`\log(\text{count})` is far
below the rounding of such a number, so two blocks whose visible keys all carry it would weigh the same
whatever their number of keys (the ring used to return the sum of each rank's mean for such a row).
Each block is therefore attended with its mask shifted, per query, by the largest mask term :math:`s_b`
among that query's visible keys in the block (:func:`attend_block`); the shift is kept beside
:math:`\ell_b` (the true lse is :math:`s_b + \ell_b`), and :func:`merge` compares
:math:`(s_a - s) + \ell_a` with :math:`(s_b - s) + \ell_b`, :math:`s = \max(s_a, s_b)`, whose
differences are exact. A query whose logits the mask term absorbs (:math:`|s_b| \ge 2^{p + 2}\,
\bar{l}`, :math:`\bar{l}` a bound on its logits, p the dtype's mantissa bits: the logit rounds to the
mask term itself, as the one-process layer computes it) attends with its logits set to 0, so it gets
what the layer gives it: the plain mean of the values whose mask term is the largest; other queries
keep their logits' digits.

Shape letters: B batch, H heads, Hkv key/value heads, t a span of the rank's queries, n a block's keys,
D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

NEG_INF = float("-inf")


@dataclass
class Partial:
    """Attention of a span of queries to the keys merged so far.

    ctx: (B, H, t, D) in the accumulation dtype; lse: (B, H, t), relative to ``shift``; shift: (B or 1,
    H or 1, t) per query (-inf where the query has seen no key), or None when the call has no additive
    mask (0).
    """

    ctx: object
    lse: object
    shift: object = None

    def total_lse(self, xp):
        """(B, H, t): the log-sum-exp of every visible logit merged so far."""
        if self.shift is None:
            return self.lse
        return xp.where(self.shift == NEG_INF, NEG_INF, self.lse + xp.where(self.shift == NEG_INF, 0, self.shift))


def attend_block(layer, xp, q, k, v, masks, scale: float, logit_bound=None, softcap=None) -> Partial:
    """The backend's core on one block: q (B, H, t, D), k and v (B, Hkv, n, D), ``masks`` the block's
    :class:`mha._masks.MaskSet`. With an additive mask, the mask is first shifted per query by its largest
    term among the query's visible keys of the block, and a query whose logits that term absorbs (a bound
    on them: ``logit_bound`` (B, H, t, 1)) attends with q = 0 (the module docstring)."""
    shift = None
    if masks.bias is not None:
        shift = _largest_visible(xp, masks)  # (b, h, t, 1), -inf where nothing is visible
        finite = xp.where(shift == NEG_INF, 0, shift)
        masks = masks.with_bias(masks.bias - finite)
        if logit_bound is not None:
            bits = np.finfo(np.dtype(str(layer._dtypes()[1]).split(".")[-1])).nmant + 2
            absorbed = xp.abs(finite) >= logit_bound * 2.0**bits  # (B, H, t, 1): s + bias rounds to bias
            q = xp.where(absorbed, 0, q)
        shift = shift[..., 0]
    ctx, lse = layer._attend(q, k, v, masks, scale=scale, softcap=softcap)[:2]
    acc = layer._dtypes()[1]
    return Partial(ctx.astype(acc), lse.astype(acc), shift)


def _largest_visible(xp, masks):
    """(b, h, t, 1): each query's largest bias over its visible keys (-inf when it sees none)."""
    visible = masks.visible(xp)
    bias = masks.bias if visible is None else xp.where(visible, masks.bias, NEG_INF)
    T, S = masks.T, masks.S
    bias = xp.broadcast_to(bias, tuple(bias.shape[:2]) + (T, S))  # a broadcast row or column: all of them
    return xp.max(bias, axis=-1, keepdims=True)


def merge(xp, acc: Partial | None, part: Partial) -> Partial:
    """``acc`` and ``part`` (the same queries, disjoint keys) merged exactly (the module docstring)."""
    if acc is None:
        return part
    la, lb = acc.lse, part.lse
    shift = None
    if acc.shift is not None or part.shift is not None:
        sa, sb = (p.shift if p.shift is not None else xp.zeros_like(p.lse) for p in (acc, part))
        shift = xp.maximum(sa, sb)
        base = xp.where(shift == NEG_INF, 0, shift)
        la, lb = la + (sa - base), lb + (sb - base)  # -inf where that side has seen nothing
    lse = xp.logaddexp(la, lb)  # -inf where neither has seen a key
    none = xp.logical_and(la == NEG_INF, lb == NEG_INF)
    d = xp.where(none, 0, lb - xp.where(none, 0, la))  # lb - la, 0 where both are -inf (not -inf - -inf)
    w = (0.5 * (1 + xp.tanh(0.5 * d)))[..., None]  # sigma(lb - la): the share of part, overflow-free
    ctx = acc.ctx + w * (part.ctx - acc.ctx)
    return Partial(ctx, lse, shift)


def with_sinks(xp, part: Partial, sinks) -> Partial:
    """``part`` merged with the sinks (H,): one more term exp(sink_h) in each query's denominator, with no
    value (a Partial of context 0 and lse sink_h), once per query whatever the number of blocks."""
    B, H, t = part.lse.shape
    lse = xp.broadcast_to(xp.reshape(sinks.astype(part.lse.dtype), (1, H, 1)), (B, H, t))
    shift = None if part.shift is None else xp.zeros_like(lse)
    return merge(xp, part, Partial(xp.zeros_like(part.ctx), lse, shift))


def empty(xp, B: int, H: int, t: int, D: int, dtype, shifted: bool) -> Partial:
    """The state of ``t`` queries that have seen no key: context 0, lse -inf."""
    lse = xp.full((B, H, t), NEG_INF, dtype=dtype)
    return Partial(xp.zeros((B, H, t, D), dtype=dtype), lse, lse if shifted else None)


def with_validity(xp, masks, valid):
    """``masks`` with the block's key validity (B, n) bool (False: padding, a ``key_mask``) ANDed in."""
    if valid is None:
        return masks
    keep = valid[:, None, None, :]
    return replace(masks, keep=keep if masks.keep is None else xp.logical_and(masks.keep, keep))
