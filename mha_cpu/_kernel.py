"""The numpy attention kernel: blockwise attention with an online softmax, as named steps.

A task is one block of queries of one batch element and a group of key/value heads (all of them, unless
a call has fewer tasks than workers, as decoding does). Its logits, (H_, n, keys), come from one batched
GEMM per block of keys, the query heads of a GQA group sharing their key/value head without copies::

    start, end = masks.key_span(...)           # keys outside are hidden from the whole block of queries
    for each block of keys in [start, end):
        s = logits(...)                         # scaled, biased, masked (-inf) logits
        part = exp_times_v(s, ...)              # e = exp(s - m) at once, no max pass; e V and row sums
        bad = out_of_band(...)                  # after the fact: did a term leave the band?
        if bad.any(): redo(...)                 # those rows again, centred on their maximum
        acc += part
    finish(...)                                 # divide by the row sums; lse; head_mask; NaN rows; W_O

Each row keeps an offset m (0 at first) and its terms are exp(s - m). The row sums returned with the PV
product tell whether a term overflowed (a sum above LIMIT, inf or NaN) or, for a row without terms yet,
whether its terms underflowed (a sum below FLOOR, which also keeps total underflow from passing for a
row with no visible key: above it, the largest term, >= sum / keys, is a normal float for up to e^27
keys): only such rows are done again, centred on their block maximum (accumulated terms rescaled). A
row's arithmetic depends on its own numbers only, which the bitwise properties (hidden keys, NaN
confinement) rely on.

Augmented form (q, k, v of width D + 1, the context of width D): k and v carry a last column of ones and
q's last column is free. It holds -m, so q'k' = qk - m and no pass subtracts the offset; and the PV
product's last column is the row sum (P [V, 1] = [PV, sum P]), so no pass sums: two of the four
elementwise passes over each block saved for one more column in each GEMM (9% at T=8192). The plain form
(RoPE or a cache: D-wide heads) subtracts and sums in passes of their own.

Overflow: logits of finite inputs may leave float32's range (|x| ~ 1e20). A row whose redo finds no
finite maximum raises :class:`Overflow`, and the layer runs the kernel again on q and k scaled down by
powers of two, with ``logit_scale`` the factor they lost: terms exp(c (s - m)), m in the scaled units.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ._options import options, tuning
from ._pool import Slot, Workers

NEG_INF = -np.inf
LIMIT = float(np.exp(30.0))  # a row sum above this (terms up to e^30) is done again, centred
FLOOR = float(np.exp(-60.0))  # a row's first terms summing below this are done again, centred

LOGITS, REDO_LOGITS = Slot("logits"), Slot("redone logits")  # (H_, n, keys) per block
ACC, PV, REDO_PV = Slot("context"), Slot("PV product"), Slot("redone PV product")  # (H_, n, Dq)


class Overflow(ArithmeticError):
    """Logits of finite inputs left float32's range; the layer runs the kernel again, rescaled."""


@dataclass(frozen=True)
class Call:
    """One kernel call.

    q: (B, T, H, Dq) queries already multiplied by the scale (unit last stride); augmented form: Dq = D + 1
        and q's last column is overwritten. k, v: (B, S, Hkv, Dq). D: the value width.
    masks: the call's mha._masks.MaskSet (keep and bias 4-D, broadcastable to (B, H, T, S), or None).
    out: (B, T, H, D), receives each head's context.
    weights: (B, H, T, S) receiving the weights (all keys in one block), or None.
    lse: (B, H, T) receiving the log-sum-exp of the visible logits (-inf if none), or None.
    head_mask: (B or 1, H) multipliers on each head's context, or None.
    poison: (rows, key_rows), (B, H, T) bools: contexts of ``rows`` become NaN (they see a non-finite key or
        value, zeroed before the call); for ``key_rows`` the weights and lse too. Or None.
    project: (W_O.T (H*D, E), b_O or None, final (B, T, E)): each task also writes its rows of out @ W_O.T
        + b_O into ``final`` (the output projection while the context is in cache). Or None.
    logit_scale: c, the power of two the logits were scaled down by (1: not at all).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    D: int
    masks: object
    out: np.ndarray
    weights: np.ndarray | None = None
    lse: np.ndarray | None = None
    head_mask: np.ndarray | None = None
    poison: tuple | None = None
    project: tuple | None = None
    logit_scale: float = 1.0

    @property
    def aug(self) -> bool:
        return self.q.shape[-1] == self.D + 1


def shrink_exponent(a, D: int) -> int:
    """p >= 0 such that a * 2^-p keeps every logit it takes part in within 2^50 of a factor's reach:
    with both q and k scaled so, |q.k| <= 2^100, far inside float32's range (NaN/inf entries ignored)."""
    top = float(np.abs(a).max(initial=0.0, where=np.isfinite(a)))
    return max(0, math.ceil(math.log2(top * math.sqrt(D))) - 50) if top > 0 else 0


def attention(call: Call, workers: Workers | None = None) -> None:
    """Run every task of ``call`` on ``workers`` (default: the calling thread alone)."""
    B, T, H, _ = call.q.shape
    S, Hkv = call.k.shape[1], call.k.shape[2]
    workers = workers or Workers(0, threads=1)
    if call.logit_scale != 1.0 and call.masks.bias is not None:  # the bias in the logits' scaled units
        bias = call.masks.bias * call.masks.bias.dtype.type(1.0 / call.logit_scale)  # exact: a power of two
        call = dataclasses.replace(call, masks=call.masks.with_bias(bias))
    single = call.weights is not None or S <= tuning.single_pass_max or T * H * S <= tuning.single_pass_floats
    step = S if single else options.block_k
    tasks, groups = plan(B, T, H, Hkv, S, step, workers.n)
    if call.masks.causal:  # the costliest first (later rows see more keys): the last task taken is short
        tasks.sort(key=lambda t: -t[2])
    if len(groups) == 1:
        def run(task):
            block(call, *task, 0, Hkv, step)
            if call.project is not None:
                project_rows(call, *task)

        workers.map(run, tasks)
        return
    # fewer tasks than workers: every (task, group of kv heads) on the pool, then W_O for all rows
    workers.map(lambda t: block(call, *t, step), [t + g for t in tasks for g in groups])
    if call.project is not None:
        for t in tasks:
            project_rows(call, *t)


def plan(B: int, T: int, H: int, Hkv: int, S: int, step: int, workers: int):
    """(tasks, groups): tasks (b, i0, i1) cover every query, groups (g0, g1) the key/value heads; a block
    of queries keeps its logits within ~16 MiB (bigger GEMMs win here) and every worker gets a task."""
    bq = options.block_q
    if bq is None:
        bq = min(max((16 << 20) // (4 * H * max(step, 1)), 32), max(256, 1024 // H))
        bq = max(16, min(bq, -(-T // max(1, -(-workers // max(B, 1))))))
    bq = max(1, min(bq, T))
    tasks = [(b, i0, min(i0 + bq, T)) for b in range(B) for i0 in range(0, T, bq)]
    splits = 1
    if 0 < len(tasks) < workers and T * S * H >= tuning.min_split_work:
        splits = max(1, min(Hkv, workers // len(tasks)))
    return tasks, [(g * Hkv // splits, (g + 1) * Hkv // splits) for g in range(splits)]


@dataclass
class _Task:
    """One task's rows and heads, and its running state: offsets m (H_, n, 1), accumulated terms (and,
    augmented, row sums in the last column) acc (H_, n, Dq), plain form's row sums l_sum (H_, n, 1)."""

    call: Call
    b: int
    i0: int
    i1: int
    g0: int
    g1: int

    def __post_init__(self):
        c = self.call
        self.n = self.i1 - self.i0
        self.G = c.q.shape[2] // c.k.shape[2]
        self.hs = slice(self.g0 * self.G, self.g1 * self.G)
        self.H_, self.Hkv_ = (self.g1 - self.g0) * self.G, self.g1 - self.g0
        self.qb = c.q[self.b, self.i0:self.i1, self.hs].reshape(self.n, self.Hkv_, self.G, -1).transpose(1, 2, 0, 3)
        dtype = c.q.dtype
        self.m = np.zeros((self.H_, self.n, 1), dtype)
        self.l_sum = None if c.aug else np.zeros((self.H_, self.n, 1), dtype)
        self.acc = None
        if c.aug:  # q's free column holds -m: (H_, n, 1) view
            self.q_m = c.q[self.b, self.i0:self.i1, self.hs, c.D].T[:, :, None]
            self.q_m[...] = 0

    def sums(self):
        """(H_, n, 1) row sums of the terms so far (a view), or None before the first block."""
        if self.call.aug:
            return None if self.acc is None else self.acc[..., self.call.D:]
        return self.l_sum

    def rows(self, a):
        """A (B?, H?, T?, ...) mask, bias or output array at this task's batch element, heads and rows."""
        a = a[self.b if a.shape[0] > 1 else 0]
        a = a[self.hs] if a.shape[0] > 1 else a
        return a[:, self.i0:self.i1] if a.shape[1] > 1 else a


def block(call: Call, b: int, i0: int, i1: int, g0: int, g1: int, step: int) -> None:
    """One task, start to finish (see the module docstring)."""
    task = _Task(call, b, i0, i1, g0, g1)
    start, end = call.masks.key_span(i0, i1)
    if call.weights is not None:  # keys wholly in the causal future or outside the window
        w = call.weights[b, task.hs, i0:i1]
        w[..., end:] = 0
        w[..., :start] = 0
    if end <= start:
        return finish_empty(task)
    dtype, Dq = call.q.dtype, call.q.shape[-1]
    with ACC.lease((task.H_, task.n, Dq), dtype) as acc, PV.lease((task.H_, task.n, Dq), dtype) as pv:
        for j0 in range(start, end, step):
            j1 = min(j0 + step, end)
            wbuf = None if call.weights is None else call.weights[b, task.hs, i0:i1, j0:j1]
            with LOGITS.lease((task.H_, task.n, j1 - j0), dtype) as buf:
                s = logits(task, j0, j1, buf if wbuf is None else wbuf)
                part = exp_times_v(task, s, j0, j1, acc if task.acc is None else pv)
                sums = part[..., call.D:] if call.aug else s_sums(task, s)
                bad = out_of_band(task, j0, j1, sums)
                if bad is not None:
                    redo(task, j0, j1, bad, part, sums, wbuf)
                accumulate(task, part, sums)
        finish(task, start, end)


def logits(task: _Task, j0: int, j1: int, buf) -> np.ndarray:
    """(H_, n, keys) logits of the task's queries against keys j0:j1, written into ``buf``: scaled (in q),
    offset (augmented: q's last column), plus the bias, -inf where hidden."""
    c, mk = task.call, task.call.masks
    kt = c.k[task.b, j0:j1, task.g0:task.g1].transpose(1, 2, 0)[:, None]  # (Hkv_, 1, Dq, keys)
    s = np.matmul(task.qb, kt, out=buf.reshape(task.Hkv_, task.G, task.n, j1 - j0)).reshape(task.H_, task.n, -1)
    if mk.bias is not None:
        s += task.rows(mk.bias)[..., j0:j1] if mk.bias.shape[3] > 1 else task.rows(mk.bias)
    if mk.keep is not None:
        keep = task.rows(mk.keep)
        np.copyto(s, NEG_INF, where=~(keep[..., j0:j1] if keep.shape[2] > 1 else keep))
    hidden = _positional_hidden(mk, task.i0, task.i1, j0, j1)
    if hidden is not None:
        np.copyto(s, NEG_INF, where=hidden)
    return s


def _positional_hidden(masks, i0: int, i1: int, j0: int, j1: int):
    """(n, keys) bool: keys j0:j1 that the causal and window rules hide from queries i0:i1; None when
    they hide none of them (the block lies wholly on the visible side)."""
    rule = masks.cut(rows=(i0, i1), cols=(j0, j1)).rule(np)
    return None if rule is None else ~rule


def exp_times_v(task: _Task, s, j0: int, j1: int, out) -> np.ndarray:
    """e = exp(c (s - m)) in place of s (the augmented form's s is offset already), then e V of keys
    j0:j1 into ``out`` (H_, n, Dq); augmented, its last column is the row sums."""
    c = task.call
    if not c.aug and task.m.any():
        s -= task.m
    if c.logit_scale != 1.0:
        s *= c.logit_scale
    np.exp(s, out=s)  # hidden -> exactly 0
    return times_v(task, s, j0, j1, out)


def times_v(task: _Task, e, j0: int, j1: int, out) -> np.ndarray:
    """(H_, n, keys) terms times the values of keys j0:j1, into ``out`` (H_, n, Dq)."""
    vb = task.call.v[task.b, j0:j1, task.g0:task.g1].transpose(1, 0, 2)[:, None]  # (Hkv_, 1, keys, Dq)
    np.matmul(e.reshape(task.Hkv_, task.G, task.n, j1 - j0), vb, out=out.reshape(task.Hkv_, task.G, task.n, -1))
    return out


def s_sums(task: _Task, e) -> np.ndarray:
    """Plain form: the row sums of the terms, by a pass of their own."""
    return e.sum(axis=2, keepdims=True)


def out_of_band(task: _Task, j0: int, j1: int, sums):
    """(H_, n, 1) bool of the rows whose terms left the band (None if none did): a sum above LIMIT, inf
    or NaN, or, for a row without terms yet, below FLOOR, unless the row sees no key in this block."""
    started = task.sums()
    bad = ~(sums <= LIMIT)  # NaN and inf fail too
    low = ~(sums >= FLOOR)
    bad |= low if started is None else low & (started == 0)
    if not bad.any():
        return None
    zero = bad & (sums == 0)
    if zero.any():
        bad &= ~(zero & ~_sees_any(task, j0, j1))
        if not bad.any():
            return None
    return bad


def _sees_any(task: _Task, j0: int, j1: int) -> np.ndarray:
    """(H_ or 1, n, 1) bool: whether each row may see some key of j0:j1."""
    mk = task.call.masks
    vis = np.ones((1, task.n, j1 - j0), bool)
    hidden = _positional_hidden(mk, task.i0, task.i1, j0, j1)
    if hidden is not None:
        vis = vis & ~hidden
    if mk.keep is not None:
        keep = task.rows(mk.keep)
        vis = vis & (keep[..., j0:j1] if keep.shape[2] > 1 else keep)
    return vis.any(axis=2, keepdims=True)


def redo(task: _Task, j0: int, j1: int, bad, part, sums, wbuf) -> None:
    """The ``bad`` rows' block again, centred on their maximum: the offsets move to it, their accumulated
    terms are rescaled, and their new terms replace theirs in ``part``, ``sums`` and the weights.

    The block's logits are computed again as they are, not relative to the old offsets: a logit relative
    to an offset far from it has lost the digits that tell keys apart (in float32, qk - m with m = -1e9,
    a row whose first block held only keys of a -1e9 padding bias, rounds to a multiple of 64), and an
    offset moved by a rounded difference (m + (max - m)) misses the maximum by as much, so that the
    largest term is exp(+-1024). Absolute, the new offset is the row's largest logit itself."""
    c = task.call
    with REDO_LOGITS.lease((task.H_, task.n, j1 - j0), c.q.dtype) as buf, \
            REDO_PV.lease(part.shape, c.q.dtype) as part2:
        if c.aug:
            task.q_m[...] = 0  # q's offset column: the logits themselves
        s = logits(task, j0, j1, buf)
        top = s.max(axis=2, keepdims=True)
        if not np.isfinite(top[bad]).all():
            _check_overflow(task, bad & ~np.isfinite(top))
        m = np.where(bad & np.isfinite(top), top, task.m)
        if task.acc is not None:  # rows centred anew: what they accumulated, rescaled (x1 elsewhere, and
            # x1 for rows without terms, whose offset may move down far: e^+big * 0 would be NaN)
            alpha = np.exp(np.where(task.sums() > 0, task.m - m, 0) * c.logit_scale).astype(c.q.dtype)
            task.acc *= alpha
            if task.l_sum is not None:
                task.l_sum *= alpha
        task.m[...] = m
        if c.aug:
            task.q_m[...] = -task.m
            s -= task.m
        exp_times_v(task, s, j0, j1, part2)  # plain form: subtracts the new offsets itself
        np.copyto(part, part2, where=bad)
        if not c.aug:
            np.copyto(sums, s_sums(task, s), where=bad)
        if wbuf is not None:
            np.copyto(wbuf, s, where=bad)


def _check_overflow(task: _Task, rows) -> None:
    """Raise :class:`Overflow` if a row without a finite maximum (``rows``, (H_, n, 1)) has a finite query:
    its logits left float32's range. (A NaN or inf query makes its row NaN, as the reference's does.)"""
    finite_q = np.isfinite(task.qb[..., :task.call.D]).all(axis=-1).reshape(task.H_, task.n, 1)
    if (rows & finite_q).any():
        raise Overflow("logits beyond float32's range")


def accumulate(task: _Task, part, sums) -> None:
    """Add a block's terms to the task's running context (the first block's already are in place)."""
    if task.acc is None:
        task.acc = part
    else:
        task.acc += part
    if task.l_sum is not None:
        task.l_sum += sums


def finish(task: _Task, start: int, end: int) -> None:
    """The context divided by the row sums straight into ``out`` (one pass), then head_mask, lse, NaN
    rows there; the weights divided too."""
    c = task.call
    sums = task.sums()
    denom = np.where(sums == 0, 1.0, sums).astype(c.q.dtype)  # (H_, n, 1); rows without terms stay 0
    ctx = c.out[task.b, task.i0:task.i1, task.hs].transpose(1, 0, 2)  # (H_, n, D), a view of out
    np.divide(task.acc[..., :c.D], denom, out=ctx)
    if c.weights is not None:
        c.weights[task.b, task.hs, task.i0:task.i1, start:end] /= denom
    if c.head_mask is not None:
        ctx *= c.head_mask[task.b if c.head_mask.shape[0] > 1 else 0][task.hs, None, None]
    if c.lse is not None:
        lse = np.log(denom[..., 0]) + task.m[..., 0] * c.logit_scale
        c.lse[task.b, task.hs, task.i0:task.i1] = np.where(sums[..., 0] == 0, NEG_INF, lse)
    if c.poison is not None:
        rows, key_rows = (p[task.b, task.hs, task.i0:task.i1] for p in c.poison)  # (H_, n)
        ctx[rows] = np.nan
        if c.weights is not None:
            c.weights[task.b, task.hs, task.i0:task.i1][key_rows] = np.nan  # a NaN logit: a NaN row
        if c.lse is not None:
            c.lse[task.b, task.hs, task.i0:task.i1][key_rows] = np.nan


def finish_empty(task: _Task) -> None:
    """A block of queries that sees no key at all: zero contexts (and weights), lse -inf."""
    c = task.call
    c.out[task.b, task.i0:task.i1, task.hs] = 0
    if c.lse is not None:
        c.lse[task.b, task.hs, task.i0:task.i1] = NEG_INF


def project_rows(call: Call, b: int, i0: int, i1: int) -> None:
    """final[b, i0:i1] = out[b, i0:i1] (all heads) @ W_O.T + b_O."""
    w_ot, b_o, final = call.project
    H, D = call.out.shape[2], call.out.shape[3]
    dst = final[b, i0:i1]
    np.matmul(call.out[b, i0:i1].reshape(i1 - i0, H * D), w_ot, out=dst)
    if b_o is not None:
        dst += b_o
