r"""The attention core's backward on numpy: FlashAttention-2's recurrence over blocks the MaskSet allows.

For scaled queries q (the logits are q . k + A), keys k, values v, the forward's contexts O and
log-sum-exp, and the contexts' cotangent dO::

    per block of queries i and keys j (the keys the MaskSet lets the block see):
        P  = exp(q_i k_j + A_ij - lse_i)        # hidden keys -inf: P = 0; a row that sees nothing: 0
        dV_j += (P Z)^T dO_i                    # Z the dropout multiplier
        dP = (dO_i v_j^T) Z
        dS = P (dP - delta_i)                   # the softmax's Jacobian, diagonal *and* rank-one parts
        dq_i += dS k_j;  dk_j += dS^T q_i       # summed over the query heads of a GQA group

When a block of queries sees all its keys in one block (up to ``thresholds.single_pass_max`` keys, 4096),
P is normalised over that block (P / r, r its row sums: 1 up to the rounding of logits computed again)
and delta = rowsum(P dP) taken from it, so the Jacobian sums to zero over each row as it must (a row of
one key gets exactly no gradient through its logit) and P is as accurate as a softmax of its own logits
(the forward's lse, from logits rounded another way, alone would move P by u |logit| when logits are
large). Past one block: P from the forward's lse and delta = dO . O.

Tasks are (batch element, key/value head, chunk of queries) on the backend's workers; a task stacks its
group's G query heads into the rows of each GEMM (five per block), so GQA costs no copies, and owns the
dk, dv of its key/value head (chunks of one head add theirs up at the end). Non-finite numbers: keys and
values holding NaN/inf are zeroed for the block products, so that P = 0 at a hidden one stays 0; a row
the forward made NaN (it sees such a key or value, or its query is NaN) takes no part in the products,
and its gradient and those of the keys it sees are set to NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mha._masks import _cut_axis

from ._options import options, thresholds
from ._workers import Workers

BLOCK_FLOATS = 1 << 18  # a block's (rows x keys) logits, about 1 MiB in float32: P and dP stay in cache
WHOLE_FLOATS = 1 << 19  # calls with at most this many logits (B H T S) run as one batched block (_whole)


def attention_backward(q, k, v, ctx, lse, dctx, masks, dropout, softcap=None, sinks=None, scale: float = 1.0):
    """(dq (B, T, H, D), dk, dv (B, S, Hkv, D), dsinks (H,) or None) of the core for the contexts'
    cotangent ``dctx``.

    q (B, T, H, D), k, v (B, S, Hkv, D) as attended (after RoPE), ctx (B, T, H, D) and lse (B, H, T) from
    the forward; masks: the call's MaskSet; dropout (B, H, T, S) or None; softcap c (logits
    c tanh(scale q.k / c) before the bias) or None; sinks (H,) learned sink logits or None (lse includes
    them). dq is the gradient of the scaled queries, scale q."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    dq = np.zeros_like(q)
    dk, dv = np.zeros(k.shape, k.dtype), np.zeros(v.shape, v.dtype)
    delta = np.einsum("bthd,bthd->bth", dctx, ctx)  # (B, T, H): rowsum(dO * O) = sum_j P_ij dP_ij
    if B == 0 or T == 0 or S == 0:
        return dq, dk, dv, _dsinks(sinks, lse, delta)
    G = H // Hkv
    poisoned = np.isnan(delta) if np.isnan(ctx).any() else None  # rows the forward made NaN
    extra = _Extra(softcap, None if sinks is None else np.asarray(sinks, q.dtype), q.dtype.type(scale))
    if B * H * T * S <= min(WHOLE_FLOATS, thresholds.single_pass_floats) and S <= thresholds.single_pass_max:
        dq, dk, dv = _whole(q, k, v, lse, dctx, poisoned, masks, dropout, extra, delta)
        return dq, dk, dv, _dsinks(sinks, lse, delta)
    bq, bk = _blocks(T, S, G)
    with Workers(10.0 * B * H * T * S * D) as workers:
        chunks = _chunks(T, bq, B * Hkv, workers.n)
        tasks = [(b, g, c0, c1) for b in range(B) for g in range(Hkv) for c0, c1 in chunks]
        parts = {t: (dk[t[0], :, t[1]], dv[t[0], :, t[1]]) if len(chunks) == 1 else
                 (np.zeros((S, D), k.dtype), np.zeros((S, D), v.dtype)) for t in tasks}
        job = _Job(q, k, v, lse.transpose(0, 2, 1), dctx, delta, poisoned, masks, dropout, dq, G, bq, bk, extra)
        workers.map(lambda t: job.task(*t, *parts[t]), tasks)
    if len(chunks) > 1:
        for (b, g, _, _), (pk, pv) in parts.items():
            dk[b, :, g] += pk
            dv[b, :, g] += pv
    return dq, dk, dv, _dsinks(sinks, lse, delta)


def _dsinks(sinks, lse, delta):
    """(H,) float64, or None without sinks: d sink_h = -sum_i P_sink,i delta_i, P_sink = exp(sink_h - lse_i)
    and delta (B, T, H) the rows' sum_j P_ij dP_ij (from the blocks, where the backward took it there)."""
    if sinks is None:
        return None
    psink = np.exp(np.asarray(sinks, np.float64)[None, :, None] - lse)  # (B, H, T)
    return -np.einsum("bht,bth->h", psink, delta.astype(np.float64))


@dataclass(frozen=True)
class _Extra:
    """The core's optional features: softcap c or None; sinks (H,) or None; and the logit scale."""

    softcap: float | None = None
    sinks: np.ndarray | None = None
    scale: float = 1.0  # multiplies q where a block's q is copied

    def logits(self, qa, ka):
        """(s, dcap): the logits less lse (..., R, m) of augmented qa (..., R, D + 1) = [q, -lse] and ka
        (..., m, D + 1) = [k, 1], before bias and masks, and with softcap d(cap)/d(logit) = 1 - tanh^2
        (None without)."""
        if self.softcap is None:
            return np.matmul(qa, np.swapaxes(ka, -1, -2)), None
        D, c = ka.shape[-1] - 1, qa.dtype.type(self.softcap)
        t = np.tanh(np.matmul(qa[..., :D], np.swapaxes(ka[..., :D], -1, -2)) / c)
        s = c * t
        s += qa[..., D:]  # -lse
        t *= t
        return s, np.subtract(1, t, out=t)

    def target(self, sinks_rows, lse_rows):
        """(..., R, 1): what each row's weights sum to, 1 - exp(sink - lse) with sinks (None: 1)."""
        if sinks_rows is None:
            return None
        return 1 - np.exp(sinks_rows - lse_rows)

    def empty(self, sinks_rows, lse_rows):
        """(..., R) bool: rows that see no key (lse -inf, or lse = the sink alone)."""
        e = lse_rows == -np.inf
        return e if sinks_rows is None else e | (lse_rows == sinks_rows)


def _blocks(T: int, S: int, G: int) -> tuple[int, int]:
    """(queries, keys) per block: options.block_q / block_k when set small (tests), else keys in one
    block up to thresholds.single_pass_max and queries so that a block's logits stay near BLOCK_FLOATS."""
    bk = S if S <= thresholds.single_pass_max else options.block_k
    bq = options.block_q or max(8, BLOCK_FLOATS // max(1, G * min(bk, S)))
    return max(1, min(bq, T)), max(1, min(bk, S))


def _chunks(T: int, bq: int, tasks: int, workers: int) -> list[tuple[int, int]]:
    """The queries cut into chunks of whole blocks so that there are about two tasks per worker (a task
    per (batch element, key/value head) alone may be fewer than the workers: MQA, B = 1)."""
    want = max(1, min(-(-2 * workers // tasks), -(-T // bq))) if workers > 1 else 1
    blocks = -(-T // bq)
    per = -(-blocks // want)
    return [(i * bq, min(T, (i + per) * bq)) for i in range(0, blocks, per)]


@dataclass
class _Job:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    lse: np.ndarray  # (B, T, H) (a view)
    dctx: np.ndarray
    delta: np.ndarray  # (B, T, H)
    poisoned: np.ndarray | None  # (B, T, H)
    masks: object
    dropout: np.ndarray | None
    dq: np.ndarray
    G: int
    bq: int
    bk: int
    extra: _Extra

    def task(self, b: int, g: int, c0: int, c1: int, dk, dv) -> None:
        """Queries c0:c1 of batch element b against key/value head g (its G query heads); dk, dv (S, D)
        receive this task's share. Keys in the augmented form (S, D + 1), a last column of ones: with q's
        last column holding -lse, q . k is the logit less lse in one GEMM."""
        h0 = g * self.G
        S, D = self.k.shape[1], self.k.shape[3]
        kb = np.ones((S, D + 1), self.k.dtype)
        kb[:, :D] = self.k[b, :, g]
        vb = np.ascontiguousarray(self.v[b, :, g])  # (S, D)
        bad = ~(np.isfinite(kb).all(1) & np.isfinite(vb).all(1))
        if bad.any():
            kb[bad, :D], vb[bad] = 0, 0
        for i0 in range(c0, c1, self.bq):
            i1 = min(i0 + self.bq, c1)
            lo, hi = self.masks.key_span(i0, i1)
            if hi > lo:
                self._rows(b, h0, i0, i1, lo, hi, kb, vb, dk, dv)

    def _rows(self, b, h0, i0, i1, lo, hi, kb, vb, dk, dv) -> None:
        """One block of queries (rows i0:i1 x G heads) against its keys lo:hi, in one block or in steps."""
        n, G, D = i1 - i0, self.G, self.q.shape[3]
        rows = (b, slice(i0, i1), slice(h0, h0 + G))
        qb = np.empty((n * G, D + 1), self.q.dtype)  # [q, -lse]
        np.multiply(self.q[rows].reshape(n * G, D), self.extra.scale, out=qb[:, :D])
        lse = self.lse[rows].reshape(n * G, 1)
        qb[:, D] = -lse[:, 0]
        sink = None if self.extra.sinks is None else np.tile(self.extra.sinks[h0:h0 + G], n)[:, None]
        target = self.extra.target(sink, lse)
        do = np.array(self.dctx[rows]).reshape(n * G, D)
        empty = self.extra.empty(sink, lse)[:, 0]  # a row that sees nothing: its logits are all -inf, P = 0
        dead = empty if self.poisoned is None else empty | self.poisoned[rows].reshape(n * G)
        if dead.any():  # no part in the products (a NaN there must not reach dk through 0 * NaN)
            qb[dead], do[dead] = 0, 0
        poisoned = None if self.poisoned is None else self.poisoned[rows].reshape(n * G)
        poisoned = poisoned if poisoned is not None and poisoned.any() else None
        dqb = np.zeros((n * G, D), qb.dtype)
        if hi - lo <= self.bk:
            d = self._block(b, h0, i0, i1, lo, hi, qb, kb, vb, do, None, target, poisoned, dqb, dk, dv)
            np.copyto(self.delta[rows], d.reshape(n, G), where=~dead.reshape(n, G))  # for the sinks' gradient
        else:
            delta = np.nan_to_num(self.delta[rows].reshape(n * G, 1))
            for j0 in range(lo, hi, self.bk):
                self._block(b, h0, i0, i1, j0, min(j0 + self.bk, hi), qb, kb, vb, do, delta, None, poisoned, dqb,
                            dk, dv)
        if poisoned is not None:
            dqb[poisoned] = np.nan
        self.dq[rows] = dqb.reshape(n, G, D)

    def _logits(self, b, h0, i0, i1, j0, j1, qb, kb):
        """((n G, m) logits of the block less the rows' lse, plus the bias, -inf where the MaskSet hides a
        key; the softcap's derivative or None)."""
        n, m, G = i1 - i0, j1 - j0, self.G
        s, dcap = self.extra.logits(qb, kb[j0:j1])
        s3 = s.reshape(n, G, m)
        blk = self.masks.cut(batch=(b, b + 1), heads=(h0, h0 + G), rows=(i0, i1), cols=(j0, j1))
        if blk.bias is not None:
            s3 += blk.bias[0].transpose(1, 0, 2)  # (G?, n?, m?) -> (n?, G?, m?)
        if blk.keep is not None:
            np.copyto(s3, -np.inf, where=~blk.keep[0].transpose(1, 0, 2))
        rule = blk.rule(np)  # (n, m) or None: the causal and window rules at these positions
        if rule is not None:
            np.copyto(s3, -np.inf, where=~rule[:, None, :])
        return s, dcap

    def _block(self, b, h0, i0, i1, j0, j1, qb, kb, vb, do, delta, target, poisoned, dqb, dk, dv) -> None:
        """One block of (rows i0:i1 x G heads) x keys j0:j1 (:func:`_step`). ``delta`` None: these are all
        the keys the rows see (``target``: what their weights sum to, None: 1). ``poisoned``: rows whose
        keys seen here get NaN gradients."""
        n, m, G = i1 - i0, j1 - j0, self.G
        s, dcap = self._logits(b, h0, i0, i1, j0, j1, qb, kb)
        if poisoned is not None:
            reached = ~np.isneginf(s[poisoned]).all(0)  # (m,): keys a poisoned row sees
        z = None
        if self.dropout is not None:
            z = self.dropout  # (B?, H?, T?, S?) cut to this block, broadcast axes kept, as a MaskSet cuts its arrays
            for axis, span in enumerate(((b, b + 1), (h0, h0 + G), (i0, i1), (j0, j1))):
                z = _cut_axis(z, axis, span)
            z = np.broadcast_to(z[0].transpose(1, 0, 2), (n, G, m))
            z = z.reshape(n * G, m)
        dq_, dk_, dv_, delta = _step(s, qb, kb[j0:j1], vb[j0:j1], do, delta, z, target, dcap)
        dqb += dq_
        dk[j0:j1] += dk_
        dv[j0:j1] += dv_
        if poisoned is not None:
            dk[j0:j1][reached] = dv[j0:j1][reached] = np.nan
        return delta


def _step(s, q, k, v, do, delta, z, target=None, dcap=None):
    """The recurrence of the module docstring on one block, any leading (batch) axes: (dq, dk, dv) parts
    and the delta used (..., R, 1).

    s (..., R, m): the logits less lse, -inf where hidden (consumed: P is written over it); q (..., R, D + 1)
    and k (..., m, D + 1) in the augmented form (the last column is ignored here), v (..., m, D); do
    (..., R, D); delta (..., R, 1), or None when these m keys are all the rows see: then P is normalised
    to sum to ``target`` (..., R, 1) (1 when None; 1 - the sink's share with sinks), the factor applied to
    the (R, D) operands, not to P, and delta = rowsum(P dP) of the very products dS is made of, so that
    each row of dS sums to what it must; z (..., R, m) dropout multipliers or None; dcap (..., R, m) the
    softcap's derivative, or None."""
    D = do.shape[-1]
    P = np.exp(s, out=s)
    Pz = P if z is None else P * z
    inv = None
    if delta is None:
        r = P.sum(axis=-1, keepdims=True)
        inv = (1 if target is None else target) / np.where(r == 0, 1, r)  # rows without a visible key: P = 0
    dv = np.matmul(np.swapaxes(Pz, -1, -2), do if inv is None else do * inv)
    dP = np.matmul(do, np.swapaxes(v, -1, -2))  # (..., R, m)
    if z is not None:
        dP *= z
    if delta is None:
        delta = np.einsum("...ij,...ij->...i", P, dP)[..., None] * inv
    dP -= delta
    dP *= P  # dS (times 1 / inv when normalised here)
    if dcap is not None:
        dP *= dcap
    if inv is None:
        return np.matmul(dP, k[..., :D]), np.matmul(np.swapaxes(dP, -1, -2), q[..., :D]), dv, delta
    return np.matmul(dP, k[..., :D]) * inv, np.matmul(np.swapaxes(dP, -1, -2), q[..., :D] * inv), dv, delta


def _whole(q, k, v, lse, dctx, poisoned, masks, dropout, extra: _Extra, delta_out):
    """The whole call as one block of every (batch element, key/value head): batched GEMMs, for calls of
    at most WHOLE_FLOATS logits (B H T S, 2 MiB in float32), where the per-task path's overhead would
    dominate (figures: docs/performance.md, "Gradients").
    Same arrays and results as attention_backward; the rows' delta written into ``delta_out`` (B, T, H)
    (rows the forward made NaN keep theirs)."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv

    def groups(a):  # (B, T, H, ...) -> (B, Hkv, T G, ...)
        return a.reshape((B, T, Hkv, G) + a.shape[3:]).transpose((0, 2, 1, 3) + tuple(range(4, a.ndim + 1))
                                                               ).reshape((B, Hkv, T * G) + a.shape[3:])

    def per_key(a):  # (B, H?, T?, S) -> (B, Hkv, T G, S), broadcast
        a = np.broadcast_to(a.reshape((1,) * (4 - a.ndim) + a.shape), (B, H, T, S))
        return a.reshape(B, Hkv, G, T, S).transpose(0, 1, 3, 2, 4).reshape(B, Hkv, T * G, S)

    qa = np.empty((B, Hkv, T * G, D + 1), q.dtype)  # [q, -lse]
    np.multiply(groups(q), extra.scale, out=qa[..., :D])
    lse_rows = groups(lse.transpose(0, 2, 1)[..., None])  # (B, Hkv, T G, 1)
    qa[..., D] = -lse_rows[..., 0]
    sink = None if extra.sinks is None else \
        groups(np.broadcast_to(extra.sinks[None, None, :, None], (B, T, H, 1)))  # (B, Hkv, T G, 1)
    ka = np.ones((B, Hkv, S, D + 1), k.dtype)
    ka[..., :D] = k.transpose(0, 2, 1, 3)
    va = np.ascontiguousarray(v.transpose(0, 2, 1, 3))  # (B, Hkv, S, D)
    bad = ~(np.isfinite(ka).all(-1) & np.isfinite(va).all(-1))
    if bad.any():
        ka[bad, :D], va[bad] = 0, 0
    do = groups(dctx)
    dead = extra.empty(sink, lse_rows)[..., 0]  # empty rows, and rows the forward made NaN
    if poisoned is not None:
        dead = dead | groups(poisoned[..., None])[..., 0]
    if dead.any():
        qa[dead] = 0
        do = np.where(dead[..., None], 0, do)
    s, dcap = extra.logits(qa, ka)  # (B, Hkv, T G, S)
    if masks.bias is not None:
        s += per_key(masks.bias)
    keep = masks.visible(np)
    if keep is not None:
        np.copyto(s, -np.inf, where=~per_key(keep))
    reached = None
    if poisoned is not None:
        rows = groups(poisoned[..., None])[..., 0]  # (B, Hkv, T G)
        reached = (~np.isneginf(s) & rows[..., None]).any(-2)  # (B, Hkv, S)
    z = None if dropout is None else per_key(dropout)
    dq, dk, dv, delta = _step(s, qa, ka, va, do, None, z, extra.target(sink, lse_rows), dcap)
    delta = delta[..., 0].reshape(B, Hkv, T, G).transpose(0, 2, 1, 3).reshape(B, T, H)
    np.copyto(delta_out, delta, where=~np.isnan(delta_out))
    if reached is not None:
        dq[rows] = np.nan
        dk[reached] = dv[reached] = np.nan
    dq = dq.reshape(B, Hkv, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)
    return dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
