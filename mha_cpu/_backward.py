r"""The numpy backend's gradients: ``mha.vjp`` analytically, from the forward's log-sum-exp, blockwise.

Forward (kept for the backward: the inputs, the projected heads q, k, v after RoPE, each head's context
O and the log-sum-exp, all O(B T E); never the (T, S) weights)::

    q, k, v = x_q W_q^T + b_q, ...             # (B, T, H, D), (B, S, Hkv, D)
    q, k = rope(q), rope(k)
    O, lse = attention(q, k, v, masks)          # (B, T, H, D), (B, H, T)
    y = concat_h(m_h O_h) W_O^T + b_O           # head_mask m

Backward, for the cotangent dy (FlashAttention-2's recurrence; s the scale, Z the dropout multiplier)::

    dW_O = dy^T concat(m O); db_O = sum dy; dO_h = m_h (dy W_O)_h
    delta_i = dO_i . O_i                        # = sum_j P_ij dP_ij: no pass over the keys for it
    per block of queries i and keys j (the keys the MaskSet lets the block see):
        P  = exp(s q_i k_j + A_ij - lse_i)      # hidden keys -inf: P = 0; a row that sees nothing: 0
        dV_j += (P Z)^T dO_i
        dP = (dO_i v_j^T) Z
        dS = P (dP - delta_i)                   # the softmax's Jacobian, diagonal *and* rank-one parts
        dq_i += s dS k_j;  dk_j += s dS^T q_i   # summed over the query heads of a GQA group
    dq, dk = rope^T(dq), rope^T(dk)             # the rotation's transpose: the opposite angle
    dx = dq W_q; dW_q = dq^T x; db_q = sum dq   # and alike for k, v

Tasks are (batch element, key/value head, chunk of queries), on the backend's workers; a task stacks its
group's G query heads into the rows of each GEMM (five per block: the logits, dP, dV, dq, dk), so GQA
costs no copies. Non-finite numbers: a key or value holding NaN/inf is zeroed for the block products
(a row that can see it is NaN already, its O being NaN), and an input row whose projection gets no
gradient (a key hidden from every query) never reaches a weight's gradient, so NaN at hidden positions
stays isolated as in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mha import _reference, _vjp
from mha._rope import apply_rope

from ._options import options, tuning
from ._pool import Workers

BLOCK_FLOATS = 1 << 18  # a block's (rows x keys) logits, about 1 MiB in float32: P and dP stay in cache


@dataclass
class Saved:
    """What the forward keeps: inputs (B, ·, ·), heads q (B, T, H, D), k, v (B, S, Hkv, D) after RoPE,
    contexts O (B, T, H, D) before head_mask, lse (B, H, T), and the call's masks, head_mask (B|1, 1, H,
    1), dropout (B, H, T, S) or None, RoPE offsets."""

    xq: np.ndarray
    xk: np.ndarray
    xv: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    ctx: np.ndarray
    lse: np.ndarray
    masks: object
    head_mask: np.ndarray | None
    dropout: np.ndarray | None
    offsets: tuple


def vjp(layer, query, key, value, call_kwargs):
    """mha.vjp on a numpy layer (see mha._vjp.vjp)."""
    call = _vjp.prepare(layer, query, key, value, call_kwargs)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        out, saved = forward(layer, call)
    shape = out.shape if call.batched else out.shape[1:]
    given = (key is not None, value is not None)

    def pull(d_out) -> _vjp.Gradients:
        d = _vjp.check_cotangent(layer, d_out, shape, call.batched)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            dx, dparams = backward(layer, saved, d)
        return _vjp.gradients(layer, call, given, dx, dparams)

    return (out if call.batched else out[0]), pull


def _linear(x, w, b):
    """x @ w.T + b: (B, L, in) -> (B, L, out)."""
    y = np.matmul(x, w.T)
    if b is not None:
        y += b
    return y


def forward(layer, call):
    """(out (B, T, E), :class:`Saved`) of a prepared call."""
    c, p = layer.config, layer._native_params()
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    xq, xk, xv = call.query, call.key, call.value
    B, T, S = call.shape
    q = _linear(xq, p["q_weight"], p["q_bias"]).reshape(B, T, H, D)
    k = _linear(xk, p["k_weight"], p["k_bias"]).reshape(B, S, Hkv, D)
    v = _linear(xv, p["v_weight"], p["v_bias"]).reshape(B, S, Hkv, D)
    offsets = (call.pos.q_offset, call.pos.k_offset)
    if c.rope is not None:
        q, k = (_rope(a, c.rope, o) for a, o in ((q, offsets[0]), (k, offsets[1])))
    ctx, lse = _attend(q, k, v, call.masks, c.effective_scale, call.dropout)
    hm = None if call.head_mask is None else call.head_mask.reshape(-1, 1, H, 1)
    merged = (ctx if hm is None else ctx * hm).reshape(B, T, H * D)
    out = _linear(merged, p["o_weight"], p["o_bias"])
    return out, Saved(xq, xk, xv, q, k, v, ctx, lse, call.masks, hm, call.dropout, offsets)


def _rope(x, rope, offset: int, transpose: bool = False):
    """RoPE on (B, L, heads, D) heads; ``transpose``: its transpose, the rotation by the opposite angle,
    computed as J R J with J the sign flip of each rotated pair's second coordinate (J [[c, -s], [s, c]] J
    = [[c, s], [-s, c]])."""
    if not transpose:
        return apply_rope(np, x.transpose(0, 2, 1, 3), rope, offset, x.dtype).transpose(0, 2, 1, 3)
    d = rope.rotated_dims(x.shape[-1])
    flip = np.ones(x.shape[-1], x.dtype)
    flip[slice(1, d, 2) if rope.traditional else slice(d // 2, d)] = -1
    y = apply_rope(np, (x * flip).transpose(0, 2, 1, 3), rope, offset, x.dtype).transpose(0, 2, 1, 3)
    return y * flip


def _attend(q, k, v, masks, scale: float, dropout):
    """(O (B, T, H, D), lse (B, H, T)): the attention core on (B, L, heads, D) heads."""
    B, T, H, D = q.shape
    if B == 0 or T == 0 or k.shape[1] == 0:  # nothing to attend: zero contexts, lse -inf
        return np.zeros_like(q), np.full((B, H, T), -np.inf, q.dtype)
    ctx, _, lse = _reference.attention(np, q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                       v.transpose(0, 2, 1, 3), scale=scale, keep=masks.full_keep(np),
                                       bias=masks.bias, dropout=dropout, acc_dtype=q.dtype)
    return np.ascontiguousarray(ctx.transpose(0, 2, 1, 3)), lse


def backward(layer, s: Saved, d_out):
    """((dx_q, dx_k, dx_v), {name: gradient}) for the cotangent d_out (B, T, E)."""
    c, p = layer.config, layer._native_params()
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    B, T, S = s.q.shape[0], s.q.shape[1], s.k.shape[1]
    merged = (s.ctx if s.head_mask is None else s.ctx * s.head_mask).reshape(B * T, H * D)
    dy = d_out.reshape(B * T, d_out.shape[2])
    grads = {"o_weight": _rows_t(dy, merged), "o_bias": None if p["o_bias"] is None else _sum_rows(dy)}
    dctx = np.matmul(dy, p["o_weight"]).reshape(B, T, H, D)
    if s.head_mask is not None:
        dctx *= s.head_mask
    delta = np.einsum("bthd,bthd->bth", dctx, s.ctx)  # (B, T, H): rowsum(dO * O)
    dq, dk, dv = attention_backward(s.q, s.k, s.v, s.lse, dctx, delta, s.masks, c.effective_scale, s.dropout)
    if c.rope is not None:
        dq, dk = _rope(dq, c.rope, s.offsets[0], True), _rope(dk, c.rope, s.offsets[1], True)
    dx = []
    for name, x, dh in (("q", s.xq, dq), ("k", s.xk, dk), ("v", s.xv, dv)):
        d2 = dh.reshape(x.shape[0] * x.shape[1], dh.shape[2] * dh.shape[3])  # (rows, heads * D)
        x2 = _isolated(x.reshape(d2.shape[0], x.shape[2]), d2)
        grads[f"{name}_weight"] = _rows_t(d2, x2)
        grads[f"{name}_bias"] = None if p[f"{name}_bias"] is None else _sum_rows(d2)
        dx.append(np.matmul(d2, p[f"{name}_weight"]).reshape(x.shape))
    return tuple(dx), grads


def _rows_t(a, b):
    """a^T b for row-major (rows, m) and (rows, n): (m, n), the sum over rows of outer products."""
    return np.matmul(a.T, b)


def _sum_rows(a):
    """(rows, n) -> (n,): the bias's gradient, summed in float64 (numpy sums a non-contiguous axis one row
    after the other, whose float32 error grows with the rows)."""
    return a.sum(axis=0, dtype=np.float64).astype(a.dtype)


def _isolated(x, d):
    """x (rows, in) with the rows whose gradient ``d`` (rows, out) is all zero set to 0 when x holds
    NaN/inf: such a row does not reach the output, and 0 * NaN must not reach a weight's gradient."""
    if np.isfinite(x).all():
        return x
    dead = ~np.any(d != 0, axis=1)
    return np.where(dead[:, None], 0, x)


# -- the attention core's backward ------------------------------------------------------------------
def attention_backward(q, k, v, lse, dctx, delta, masks, scale: float, dropout):
    """(dq (B, T, H, D), dk, dv (B, S, Hkv, D)) of the core's output for its cotangent ``dctx`` (B, T, H, D).

    q (B, T, H, D), k, v (B, S, Hkv, D) as attended (after RoPE), lse (B, H, T) from the forward, delta
    (B, T, H) = rowsum(dctx * O); masks: the call's MaskSet; dropout (B, H, T, S) or None."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    dq = np.zeros_like(q)
    dk, dv = np.zeros(k.shape, k.dtype), np.zeros(v.shape, v.dtype)
    if B == 0 or T == 0 or S == 0:
        return dq, dk, dv
    G = H // Hkv
    bq, bk = _blocks(T, S, G)
    flops = 10.0 * B * H * T * S * D
    with Workers(flops) as workers:
        chunks = _chunks(T, bq, B * Hkv, workers.n)
        parts = {}
        tasks = [(b, g, c0, c1) for b in range(B) for g in range(Hkv) for c0, c1 in chunks]
        for t in tasks:
            parts[t] = (dk[t[0], :, t[1]], dv[t[0], :, t[1]]) if len(chunks) == 1 else \
                (np.zeros((S, D), k.dtype), np.zeros((S, D), v.dtype))
        lse_t = np.ascontiguousarray(lse.transpose(0, 2, 1))  # (B, T, H)
        job = _Job(q, k, v, lse_t, dctx, delta, masks, scale, dropout, dq, G, bq, bk)
        workers.map(lambda t: job.task(*t, *parts[t]), tasks)
    if len(chunks) > 1:
        for (b, g, _, _), (pk, pv) in parts.items():
            dk[b, :, g] += pk
            dv[b, :, g] += pv
    return dq, dk, dv


def _blocks(T: int, S: int, G: int) -> tuple[int, int]:
    """(queries, keys) per block: options.block_q / block_k when set small (tests), else keys in one
    block up to tuning.single_pass_max and queries so that a block's logits stay near BLOCK_FLOATS."""
    bk = S if S <= tuning.single_pass_max else options.block_k
    bq = options.block_q or max(8, BLOCK_FLOATS // max(1, G * min(bk, S)))
    return max(1, min(bq, T)), max(1, min(bk, S))


def _chunks(T: int, bq: int, tasks: int, workers: int) -> list[tuple[int, int]]:
    """The queries cut into chunks of whole blocks so that there are about two tasks per worker (a task
    per (batch element, key/value head) alone may be fewer than the workers: MQA, B = 1)."""
    want = max(1, min(-(-2 * workers // tasks), -(-T // bq))) if workers > 1 else 1
    blocks = -(-T // bq)
    per = -(-blocks // want)
    return [(i * bq, min(T, (i + per) * bq)) for i in range(0, blocks, per)]


def _cut(a, b: int, h0: int, h1: int, i0: int, i1: int, j0: int, j1: int):
    """A 4-D (B?, H?, T?, S?) array broadcastable to (B, H, T, S) cut to batch b, heads h0:h1, rows
    i0:i1, columns j0:j1, broadcast axes kept: (G or 1, n or 1, m or 1). (The MaskSet's block method
    replaces it when the core lands.)"""
    a = a[b if a.shape[0] > 1 else 0]
    a = a[h0:h1] if a.shape[0] > 1 else a
    a = a[:, i0:i1] if a.shape[1] > 1 else a
    return a[..., j0:j1] if a.shape[2] > 1 else a


@dataclass
class _Job:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    lse: np.ndarray  # (B, T, H)
    dctx: np.ndarray
    delta: np.ndarray  # (B, T, H)
    masks: object
    scale: float
    dropout: np.ndarray | None
    dq: np.ndarray
    G: int
    bq: int
    bk: int

    def task(self, b: int, g: int, c0: int, c1: int, dk, dv) -> None:
        """Queries c0:c1 of batch element b against key/value head g (its G query heads); dk, dv (S, D)
        receive this task's share."""
        G, h0 = self.G, g * self.G
        kb = np.ascontiguousarray(self.k[b, :, g])  # (S, D)
        vb = np.ascontiguousarray(self.v[b, :, g])
        bad = ~(np.isfinite(kb).all(1) & np.isfinite(vb).all(1))
        if bad.any():  # rows that see them are NaN through O already
            kb[bad], vb[bad] = 0, 0
        for i0 in range(c0, c1, self.bq):
            i1 = min(i0 + self.bq, c1)
            lo, hi = self.masks.key_span(i0, i1)
            if hi <= lo:
                continue
            n = i1 - i0
            rows = (b, slice(i0, i1), slice(h0, h0 + G))
            qb = (self.q[rows] * self.q.dtype.type(self.scale)).reshape(n * G, -1)
            do = np.ascontiguousarray(self.dctx[rows]).reshape(n * G, -1)
            lse = self.lse[rows].reshape(n * G, 1)
            empty = lse == -np.inf  # a row that sees nothing: its logits are all -inf, P = 0
            if empty.any():
                lse = np.where(empty, 0, lse)
                qb[empty[:, 0]] = 0  # a NaN there must not reach dk through 0 * NaN
            dqb = np.zeros_like(qb)
            if hi - lo <= self.bk:  # the rows' keys in one block: P normalised there, delta from it
                self._block(b, h0, i0, i1, lo, hi, qb, kb, vb, do, lse, None, dqb, dk, dv)
            else:  # in steps: P from the forward's lse, delta = dO . O
                delta = self.delta[rows].reshape(n * G, 1)
                for j0 in range(lo, hi, self.bk):
                    self._block(b, h0, i0, i1, j0, min(j0 + self.bk, hi), qb, kb, vb, do, lse, delta, dqb, dk, dv)
            dqb *= self.q.dtype.type(self.scale)
            self.dq[rows] = dqb.reshape(n, G, -1)

    def _logits(self, b, h0, i0, i1, j0, j1, qb, kb):
        """(n G, m) scaled logits of the block plus the bias, -inf where the MaskSet hides a key."""
        n, m, G = i1 - i0, j1 - j0, self.G
        s = np.matmul(qb, kb[j0:j1].T)
        s3 = s.reshape(n, G, m)
        mk = self.masks
        if mk.bias is not None:
            s3 += _cut(mk.bias, b, h0, h0 + G, i0, i1, j0, j1).transpose(1, 0, 2)
        if mk.keep is not None:
            keep = _cut(mk.keep, b, h0, h0 + G, i0, i1, j0, j1).transpose(1, 0, 2)
            np.copyto(s3, -np.inf, where=~keep)
        if mk.crosses(i0, i1, j0, j1):
            np.copyto(s3, -np.inf, where=~mk.causal_keep(np, rows=(i0, i1), cols=(j0, j1))[:, None, :])
        return s

    def _block(self, b, h0, i0, i1, j0, j1, qb, kb, vb, do, lse, delta, dqb, dk, dv) -> None:
        """One block of (rows i0:i1 x G heads) x keys j0:j1: the recurrence of the module docstring.

        ``delta`` None: these are all the keys the rows see, and P = exp(s - lse) is normalised over
        them (P / r, r its row sums, 1 up to the rounding of the logits, which differs from the forward's)
        and delta = rowsum(P dP) taken from this block: the softmax's Jacobian then sums to zero over each
        row as it must (a row of one key gets exactly no gradient through its logit), and P keeps the
        accuracy of a softmax of its own logits. The 1/r is applied to the (n G, D) operands, not to P."""
        n, m, G = i1 - i0, j1 - j0, self.G
        s = self._logits(b, h0, i0, i1, j0, j1, qb, kb)
        s -= lse
        P = np.exp(s, out=s)  # (n G, m)
        inv = None
        if delta is None:
            r = P.sum(axis=1, keepdims=True)
            inv = 1 / np.where(r == 0, 1, r)  # rows without a visible key: P = 0 stays 0
        z = None if self.dropout is None else _cut(self.dropout, b, h0, h0 + G, i0, i1, j0, j1).transpose(1, 0, 2)
        Pz = P if z is None else (P.reshape(n, G, m) * z).reshape(n * G, m)
        dv[j0:j1] += np.matmul(Pz.T, do if inv is None else do * inv)
        dP = np.matmul(do, vb[j0:j1].T)  # (n G, m)
        if z is not None:
            dP.reshape(n, G, m)[...] *= z
        if delta is None:
            delta = np.einsum("ij,ij->i", P, dP)[:, None] * inv
        dP -= delta
        dP *= P  # dS (times r when normalised here)
        if inv is None:
            dqb += np.matmul(dP, kb[j0:j1])
            dk[j0:j1] += np.matmul(dP.T, qb)
        else:
            dqb += np.matmul(dP, kb[j0:j1]) * inv
            dk[j0:j1] += np.matmul(dP.T, qb * inv)
