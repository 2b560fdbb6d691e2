r"""The numpy attention core: ``attend(q, k, v, masks, ...)``, blockwise, with an online softmax.

One task is a block of n queries of one batch element and a group of key/value heads (its H_ query
heads share their key/value heads without copies); it visits the keys its rows may see
(``masks.key_span``) in blocks and keeps, per row, an offset m (0 at first), the running sum l and the
running context a::

    for each block of keys:
        s = q k^T                                   (H_, n, keys)   q pre-multiplied by the scale
        s = c tanh(s / c)                           with a soft-cap c
        s = s + bias;  s = -inf where hidden        (masks.cut(...).visible)
        e = exp(F (s - m))                          F = 2^E, 1 unless the logits overflowed (below)
        if a row's sum of e left [FLOOR, LIMIT]:    (too large, inf, NaN; or a first block underflowing)
            m = that row's largest logit; its a and l times exp(F (m_old - m)); its e again
        a += e v;  l += sum(e)
    context = a / l;  lse = log l + F m             (rows with l = 0: context 0, lse -inf)
    sinks: lse' = log(e^lse + e^sink_h); context and weights times e^(lse - lse')

So the max pass of the textbook online softmax is skipped: terms are taken at the current offset and only rows whose
sums leave the band are done again, centred (a row's arithmetic depends on its own numbers only, which the bitwise
properties of hidden keys and NaN isolation rely on). With weights requested, a task takes all its keys in one block
and e is written straight into the weights.

Non-finite keys and values: zeroed (in copies) before the tasks run, and the rows that see one get a NaN context (a
NaN key: NaN weights and lse too). Overflow: a row whose logits leave the dtype's range although its query is finite
(|q.k| past 3.4e38 in float32), or whose context does, raises :class:`Overflow`; the call then runs again on q, k
and v scaled down by powers of two, with E (an int, applied in steps that stay within the dtype) the factor the
logits lost, so finite inputs give finite results at every magnitude.
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from mha import _reference
from mha._reference import exponent_excess

from ._options import options, thresholds
from ._workers import Workers

NEG_INF = -np.inf
LIMIT = float(np.exp(30.0))  # a row sum above this (terms up to e^30) is done again, centred
FLOOR = float(np.exp(-60.0))  # a row's first terms summing below this are done again, centred
_ERR = dict(invalid="ignore", over="ignore", divide="ignore")


def _red(ufunc, a) -> float:  # a whole-array reduction (np.minimum, np.maximum, np.add) as a float
    return float(ufunc.reduce(a, axis=None))


def all_finite(a) -> bool:
    """Whether ``a`` holds no NaN/inf: one sum (its overflow alone sends it to the exact check)."""
    return math.isfinite(_red(np.add, a)) or bool(np.isfinite(a).all())


class Overflow(ArithmeticError):
    """Logits or a context of finite inputs left the dtype's range: :func:`attend` runs again, rescaled."""


def times_pow2(x, e: int):  # x * 2^e in place (e an int of any size), in steps within float32's range
    while e:
        step = max(-100, min(100, e))
        x *= math.ldexp(1.0, step)
        e -= step
    return x


def zeroed(a, bad):
    """``a`` (B, Hkv, S, D) with the vectors flagged in ``bad`` (B, Hkv, S) zeroed, copied with a's own
    strides (BLAS may round another layout differently: rows that see none keep a clean call's bits)."""
    if min(a.strides) < 0:
        return np.where(bad[..., None], 0, a)
    span = sum((n - 1) * st for n, st in zip(a.shape, a.strides)) + a.itemsize
    out = np.lib.stride_tricks.as_strided(np.empty(span // a.itemsize, a.dtype), a.shape, a.strides)
    np.copyto(out, a)
    out[bad] = 0
    return out


# One run: q (B, H, T, D) times the scale; k, v (B, Hkv, S, D), non-finite vectors zeroed and flagged in
# bad = (keys, values) (B, Hkv, S) bools, or None; masks (its bias in the logits' units); ctx (B, T, H, D),
# lse (B, H, T), weights (B, H, T, S) or None to fill; the logits are s * 2^E; softcap; sinks (H,) or None.
Call = namedtuple("Call", "q k v masks ctx lse weights E bad softcap sinks")


def attend(q, k, v, masks, *, scale: float, softcap=None, sinks=None, dropout=None, return_weights: bool = False,
           finite: bool | None = None, out=None):
    """(context (B, H, T, D), lse (B, H, T)[, weights (B, H, T, S)]) as :func:`mha.reference.attend` defines
    them, for numpy float32/float64 q (B, H, T, D), k and v (B, Hkv, S, D) and a MaskSet over (B, H, T, S).
    ``finite``: True when the caller knows k and v hold no NaN/inf (a cache remembers), None: checked.
    ``out``: (context (B, T, H, D), lse, weights or None) arrays (views) to write into. Dropout takes the
    reference's arithmetic."""
    (B, H, T, D), S = q.shape, k.shape[2]
    if dropout is not None or 0 in (B, T, S):
        with np.errstate(**_ERR):
            return _reference.attend(np, q, k, v, masks, scale=scale, softcap=softcap, sinks=sinks, dropout=dropout,
                                     return_weights=return_weights)
    dt = q.dtype
    with np.errstate(**_ERR):
        bad = None
        if not (finite or (all_finite(k) and all_finite(v))):
            bad = ~np.isfinite(k).all(-1), ~np.isfinite(v).all(-1)  # (B, Hkv, S)
            k, v = zeroed(k, bad[0]), zeroed(v, bad[1])
        # |q scale| / 2^E <= 2^45; the layer's q comes scaled (scale 1): its overflow takes the rerun
        E = exponent_excess(np, q, 45 - math.frexp(abs(scale))[1]) if scale not in (0, 1) else 0
        q = q * dt.type(math.ldexp(scale, -E)) if (scale != 1 or E) else q
        if (T == 1 and not (out or return_weights or E) and bad is None and softcap is None and sinks is None
                and masks.bias is None and masks.every_key_visible and H * S <= thresholds.single_pass_floats
                and Workers(4.0 * B * S * H * D).n == 1):  # one task, one block: run() would do the same
            found = one_query(q, k, v)  # a decode step's one task, in short (None: the general path does it)
            if found is not None:
                return found
        sink = None if sinks is None else np.asarray(sinks, np.float64)
        ctx, lse, weights = out or (np.empty((B, T, H, D), dt), np.empty((B, H, T), dt),
                                    np.empty((B, H, T, S), dt) if return_weights else None)
        flops = 4.0 * B * T * S * H * D
        try:
            run(Call(q, k, v, masks, ctx, lse, weights, E, bad, softcap, sink), flops)
        except Overflow:  # every row again on q, k, v scaled down by powers of two
            pq, pk, pv = (exponent_excess(np, a, b) for a, b in ((q, 45), (k, 45), (v, 60)))
            q, k, v = (times_pow2(a.astype(dt), -p) for a, p in ((q, pq), (k, pk), (v, pv)))
            run(Call(q, k, v, masks, ctx, lse, weights, E + pq + pk, bad, softcap, sink), flops)
            times_pow2(ctx, pv)
    context = ctx.transpose(0, 2, 1, 3)  # (B, H, T, D) view
    return (context, lse, weights) if return_weights else (context, lse)


def run(call: Call, flops: float) -> None:
    """Every task of ``call``, on the workers that ``flops`` of work gets (mha_cpu._workers)."""
    B, H, T, _ = call.q.shape
    Hkv, S = call.k.shape[1], call.k.shape[2]
    if call.E and call.masks.bias is not None and call.softcap is None:  # the bias in the logits' units
        call = call._replace(masks=call.masks.with_bias(times_pow2(call.masks.bias.copy(), -call.E)))
    single = call.weights is not None or S <= thresholds.single_pass_max or T * H * S <= thresholds.single_pass_floats
    step = S if single else options.block_k  # weights asked: all keys in one block, e written into them
    with Workers(flops) as workers:
        tasks = plan(B, T, H, Hkv, S, step, workers.n, call.masks.positional)
        if len(tasks) == 1:
            return task(call, *tasks[0], step)
        if call.masks.causal:  # the costliest first (later rows see more keys): the last task taken is short
            tasks.sort(key=lambda t: -t[3])
        workers.map(lambda t: task(call, *t, step), tasks)


def plan(B: int, T: int, H: int, Hkv: int, S: int, step: int, workers: int, banded: bool = False) -> list:
    """Tasks (b0, b1, i0, i1, g0, g1) covering every batch element, query and key/value head: a block of
    queries keeps its logits within ~16 MiB (``banded``, a causal or window rule: at most 256 queries, which
    skip the keys they cannot see) and every worker gets a task; on one thread, batch elements whose queries
    fit one task share it (one task for a decode step); with fewer tasks than workers (a few tokens against
    a long cache), the key/value heads are split over the idle workers."""
    bq = options.block_q
    budget = (16 << 20) // (4 * H * max(step, 1))  # query rows of one task
    budget = min(budget, 256) if banded else budget
    if workers == 1 and B * T <= budget and (bq is None or bq >= T):  # one task (a decode step)
        return [(0, B, 0, T, 0, Hkv)]
    if bq is None:
        bq = min(max(budget, 32), max(256, 1024 // H))
        bq = max(16, min(bq, -(-T // max(1, -(-workers // max(B, 1))))))
    bq = max(1, min(bq, T))
    nb = max(1, min(B, budget // T)) if workers == 1 and bq == T else 1  # batch elements per task
    rows = [(b, min(b + nb, B), i0, min(i0 + bq, T)) for b in range(0, B, nb) for i0 in range(0, T, bq)]
    splits = 1
    if len(rows) < workers and T * S * H >= thresholds.min_split_work:
        splits = max(1, min(Hkv, workers // len(rows)))
    return [r + (g * Hkv // splits, (g + 1) * Hkv // splits) for r in rows for g in range(splits)]


class _Task:
    """One task's batch elements b0:b1, rows i0:i1, key/value heads g0:g1 (query heads h0:h1) and running
    state: offsets m and sums l (B_, H_, n, 1), context a (B_, H_, n, D)."""

    def __init__(self, call: Call, b0: int, b1: int, i0: int, i1: int, g0: int, g1: int):
        self.call, self.b0, self.b1, self.i0, self.i1, self.g0, self.g1 = call, b0, b1, i0, i1, g0, g1
        self.B_, self.n, self.G = b1 - b0, i1 - i0, call.q.shape[1] // call.k.shape[1]
        self.h0, self.h1 = g0 * self.G, g1 * self.G
        self.H_, self.Hkv_ = self.h1 - self.h0, g1 - g0
        m = call.masks
        self.plain = m.keep is None and m.bias is None and not m.positional  # no mask at all
        self.masks = m if self.plain else m.cut(batch=(b0, b1), heads=(self.h0, self.h1), rows=(i0, i1))
        self.qb = call.q[b0:b1, self.h0:self.h1, i0:i1].reshape(self.B_, self.Hkv_, self.G, self.n, -1)
        self.kt = call.k[b0:b1, g0:g1, None].swapaxes(-1, -2)  # (B_, Hkv_, 1, D, S)
        self.rows = (self.G,) if self.n == 1 else (self.G, self.n)  # one query: e v one GEMM per kv head
        self.vb = call.v[b0:b1, g0:g1, None] if self.n > 1 else call.v[b0:b1, g0:g1]  # (B_, Hkv_, [1,] S, D)
        self.m = np.zeros((self.B_, self.H_, self.n, 1), call.q.dtype)
        self.l = self.acc = self.seen_bad = None  # no terms yet; seen_bad: (key, value) (B_, H_, n, 1) bools
        self.centred = False  # whether an offset ever moved from 0

    def finite_rows(self):  # (B_, H_, n): the rows whose query is finite
        return np.isfinite(self.qb).all(axis=-1).reshape(self.B_, self.H_, self.n)


def task(call: Call, b0: int, b1: int, i0: int, i1: int, g0: int, g1: int, step: int) -> None:
    """One task, start to finish (the module docstring's loop)."""
    t = _Task(call, b0, b1, i0, i1, g0, g1)
    lo, hi = t.masks.key_span()
    wrows = None if call.weights is None else call.weights[b0:b1, t.h0:t.h1, i0:i1]  # (B_, H_, n, S)
    if wrows is not None:  # keys wholly in the causal future or outside the window
        wrows[..., hi:], wrows[..., :lo] = 0, 0
    for j0 in range(lo, hi, step):
        j1 = min(j0 + step, hi)
        e = np.empty((t.B_, t.H_, t.n, j1 - j0), call.q.dtype) if wrows is None else wrows[..., j0:j1]
        block = t.masks if t.plain else t.masks.cut(cols=(j0, j1))
        vis = block.visible(np)  # (B_ or 1, H_ or 1, n or 1, keys or 1), or None
        terms(t, logits(t, block, vis, j0, j1, e))
        sums = np.add.reduce(e, axis=-1, keepdims=True)
        bad = out_of_band(t, sums, vis)
        if bad is not None:
            recentre(t, block, vis, j0, j1, bad, e, sums)
        if call.bad is not None:
            note_bad(t, vis, j0, j1)
        accumulate(t, e, j0, j1, sums)
    finish(t, lo, hi)


def logits(t: _Task, block, vis, j0: int, j1: int, out):
    """(B_, H_, n, keys) logits of keys j0:j1 into ``out``: q k^T, soft-capped, plus the bias, -inf where
    hidden (in units of 2^E, or true units with a soft-cap)."""
    c = t.call
    s = np.matmul(t.qb, t.kt[..., j0:j1], out=out.reshape(t.qb.shape[:-1] + (-1,))).reshape(out.shape)  # (a view)
    if c.softcap is not None:  # the cap hides an overflow from the band: q.k must be in range first
        if not math.isfinite(_red(np.add, s)) and (~np.isfinite(s).all(axis=-1) & t.finite_rows()).any():
            raise Overflow("logits beyond the dtype's range")
        times_pow2(s, c.E)  # true logits (+-inf past the range: capped to +-c)
        np.tanh(s / c.softcap, out=s)
        s *= c.softcap
    if block.bias is not None:
        s += block.bias
    if vis is not None:
        np.copyto(s, NEG_INF, where=~vis)
    return s


def terms(t: _Task, s) -> None:  # e = exp(F (s - m)), in place of s
    if t.centred:
        s -= t.m
    if t.call.E and t.call.softcap is None:
        times_pow2(s, t.call.E)
    np.exp(s, out=s)  # hidden -> exactly 0


def out_of_band(t: _Task, sums, vis):
    """(B_, H_, n, 1) bool of the rows whose terms left the band (None if none did): a sum above LIMIT, inf
    or NaN, or, for a row without terms yet, below FLOOR, unless the row sees no key in this block."""
    if FLOOR <= _red(np.minimum, sums) and _red(np.maximum, sums) <= LIMIT:  # the common case (NaN fails)
        return None
    bad = ~(sums <= LIMIT)  # NaN and inf fail too
    bad |= ~(sums >= FLOOR) & (True if t.l is None else t.l == 0)
    if not bad.any():
        return None
    empty = bad & (sums == 0)
    if empty.any() and vis is not None:  # a row that sees no key here is not out of band
        bad &= ~(empty & ~vis.any(axis=-1, keepdims=True))
    return bad if bad.any() else None


def recentre(t: _Task, block, vis, j0: int, j1: int, bad, e, sums) -> None:
    """The ``bad`` rows' block again, centred: their offsets move to their largest logit (computed anew,
    not relative to the old offset, whose rounding would miss it), their accumulated context and sum are
    rescaled, and their new terms replace theirs in ``e`` and ``sums``."""
    c = t.call
    s = logits(t, block, vis, j0, j1, np.empty(e.shape, e.dtype))
    top = s.max(axis=-1, keepdims=True)
    if not np.isfinite(top[bad]).all():  # past the range from a finite query: rescale (a NaN query: NaN)
        if (bad & ~np.isfinite(top) & t.finite_rows()[..., None]).any():
            raise Overflow("logits beyond the dtype's range")
    m = np.where(bad & np.isfinite(top), top, t.m)
    if t.l is not None:  # rows without terms keep theirs (0: e^+big * 0 would be NaN)
        alpha = np.exp(times_pow2(np.where(t.l > 0, t.m - m, 0), c.E if c.softcap is None else 0))
        t.acc *= alpha
        t.l *= alpha
    t.m[...], t.centred = m, True
    terms(t, s)
    np.copyto(e, s, where=bad)
    np.copyto(sums, np.add.reduce(s, axis=-1, keepdims=True), where=bad)


def note_bad(t: _Task, vis, j0: int, j1: int) -> None:
    """Remember which rows see a zeroed non-finite key or value among keys j0:j1."""
    vis = None if vis is None else vis.reshape(vis.shape[:1] + ((t.Hkv_, t.G) if vis.shape[1] > 1 else (1, 1))
                                               + vis.shape[2:])  # (B_?, Hkv_?, G?, n?, keys?)
    seen = [np.broadcast_to((f if vis is None else f & vis).any(axis=-1), (t.B_, t.Hkv_, t.G, t.n)).reshape(
        t.B_, t.H_, t.n, 1) for f in (a[t.b0:t.b1, t.g0:t.g1, None, None, j0:j1] for a in t.call.bad)]
    t.seen_bad = seen if t.seen_bad is None else [a | b for a, b in zip(t.seen_bad, seen)]


def accumulate(t: _Task, e, j0: int, j1: int, sums) -> None:  # a += e v, l += sums
    pv = np.matmul(e.reshape(t.B_, t.Hkv_, *t.rows, -1), t.vb[..., j0:j1, :]).reshape(t.B_, t.H_, t.n, -1)
    t.acc, t.l = (pv, sums) if t.acc is None else (t.acc + pv, t.l + sums)


def one_query(q, k, v):
    """:func:`task` for one query per row, one block of keys and nothing but q, k and v: its numpy calls on its
    shapes (its bits) without its bookkeeping; (context (B, H, 1, D), lse (B, H, 1)), or None when a row sum
    leaves the band or the context the range (then the general path does it all). Kept for its measured
    gain: ``benchmarks/decode_parts.py`` (docs/performance.md)."""
    (B, H, _, D), (Hkv, S) = q.shape, k.shape[1:3]
    e = np.empty((B, H, 1, S), q.dtype)
    np.matmul(q.reshape(B, Hkv, -1, 1, D), k[:, :, None].swapaxes(-1, -2), out=e.reshape(B, Hkv, -1, 1, S))
    sums = np.add.reduce(np.exp(e, out=e), axis=-1, keepdims=True)  # (B, H, 1, 1)
    if not (FLOOR <= _red(np.minimum, sums) and _red(np.maximum, sums) <= LIMIT):
        return None
    acc = np.matmul(e.reshape(B, Hkv, -1, S), v).reshape(B, H, 1, D)
    np.divide(acc, np.maximum(sums, np.finfo(e.dtype).tiny), out=acc)
    return (acc, np.log(sums)[..., 0]) if math.isfinite(_red(np.add, acc)) else None


def finish(t: _Task, lo: int, hi: int) -> None:
    """Context a / l straight into ``ctx`` (one pass), weights divided too, lse, sinks, NaN rows."""
    c, dt = t.call, t.call.q.dtype
    ctx = c.ctx[t.b0:t.b1, t.i0:t.i1, t.h0:t.h1].transpose(0, 2, 1, 3)  # (B_, H_, n, D) view
    lse = c.lse[t.b0:t.b1, t.h0:t.h1, t.i0:t.i1]  # (B_, H_, n) view
    l = np.zeros_like(t.m) if t.l is None else t.l
    rows = np.log(l)  # lse of the visible keys: log l + F m (-inf for no key: l = 0)
    if t.centred:
        rows = rows + times_pow2(t.m.astype(np.float64), 0 if c.softcap is not None else c.E)
    denom = np.maximum(l, np.finfo(dt).tiny)  # a row with no key divides 0 (a first block sums >= FLOOR)
    if c.sinks is not None:  # the visible keys' share e^(lse - lse') of a denominator with the sink in it
        total = np.logaddexp(rows, c.sinks[t.h0:t.h1, None, None])
        share = np.where(np.isfinite(rows), np.exp(rows - total), rows == np.inf)
        denom = (denom / share).astype(dt)  # share 0: inf, a zero context
        rows = np.where(rows == np.inf, rows, total)
    lse[...] = rows[..., 0]
    if t.acc is None:
        ctx[...] = 0
    else:
        np.divide(t.acc, denom, out=ctx)
        if not math.isfinite(_red(np.add, ctx)):  # (a sum past the range too: then checked row by row)
            _check_context(t, ctx)
    if c.weights is not None:
        c.weights[t.b0:t.b1, t.h0:t.h1, t.i0:t.i1, lo:hi] /= denom
    if t.seen_bad is not None:
        by_key, by_value = (s[..., 0] for s in t.seen_bad)
        ctx[by_key | by_value] = np.nan
        lse[by_key] = np.nan
        if c.weights is not None:
            c.weights[t.b0:t.b1, t.h0:t.h1, t.i0:t.i1][by_key] = np.nan  # a NaN logit: a NaN row


def _check_context(t: _Task, ctx) -> None:
    """A context that left the range from finite numbers (values near the dtype's limit): Overflow."""
    rows = ~np.isfinite(ctx).all(axis=-1)  # (B_, H_, n)
    rows &= t.finite_rows() & np.isfinite(t.l[..., 0])  # (acc: l is set)
    if t.seen_bad is not None:
        rows &= ~(t.seen_bad[0] | t.seen_bad[1])[..., 0]
    if rows.any():
        raise Overflow("a context beyond the dtype's range")
