r"""Gradients of attention, for testing: an independent loop oracle, the tolerance rule, a check_vjp.

:func:`oracle_vjp` is multi-head attention and its vector-Jacobian product written as an explicit loop
over batch, head and query, in any float dtype: heads sliced out of the weights, each row's softmax
Jacobian :math:`J = \mathrm{diag}(p) - p p^\top` built as a matrix and applied as such. It shares no code
with the backends (nor with :mod:`mha.testing.oracle`, whose forward it reproduces), so a backward that
drops the rank-one part of the Jacobian, transposes a head or forgets a GQA group's sum disagrees with it.

Tolerance (FlashAttention's rule, as for the forward): a gradient computed in float32 may be off the
exact one by at most a small multiple of what the oracle itself is off in float32,

.. math::

    |g - g_{64}| \le F\,\max|g^{oracle}_{32} - g_{64}| + F\,u_{32}\max|g_{64}|

per gradient tensor, F = :data:`FACTOR` (4, the bound the project's done-when states against torch), the
second term a floor of a few units of roundoff at the tensor's own scale (a tensor of a handful of
entries can fall on a lucky rounding in the oracle).

:func:`directional` is JAX's ``check_vjp`` in float64: for a random direction t over every input and
weight and a random cotangent c, :math:`\langle c, J t\rangle` by central differences of the float64
oracle's forward against :math:`\langle J^\top c, t\rangle` from the gradients under test.
"""

from __future__ import annotations

import math

import numpy as np

from .. import AttentionWeights
from .oracle import additive, visible_keys

FACTOR = 4.0
INPUTS = ("query", "key", "value")
NAMES = ("q_weight", "k_weight", "v_weight", "o_weight", "q_bias", "k_bias", "v_bias", "o_bias")
_U32 = 2.0**-24


def _rotation(rope, first: int, length: int, D: int, sign: float):
    """(index a, index b, complex factors (length, d/2)) of RoPE at positions first..first+length-1,
    rotated by sign * angle; pairs (x_a, x_b) as complex numbers x_a + i x_b."""
    d = rope.rotated_dims(D)
    a = np.arange(d // 2) * 2 if rope.traditional else np.arange(d // 2)
    b = a + 1 if rope.traditional else a + d // 2
    pos = (first + np.arange(length))[:, None] * rope.scale
    theta = pos * rope.base ** (-2.0 * np.arange(d // 2)[None, :] / d)
    return a, b, np.exp(1j * sign * theta)


def _rotate(x, rope, first: int, sign: float):
    """x (L, D) with each pair rotated by sign * its angle (sign -1: the transpose)."""
    a, b, f = _rotation(rope, first, x.shape[0], x.shape[1], sign)
    z = (x[:, a] + 1j * x[:, b]) * f.astype(np.result_type(x.dtype, np.complex64))
    y = x.copy()
    y[:, a], y[:, b] = z.real, z.imag
    return y


def oracle_vjp(weights: AttentionWeights, query, key, value, d_out, *, mask=None, key_mask=None, causal=False,
               head_mask=None, scale=None, rope=None, window=None, dropout=None, softcap=None, qk_norm=None,
               dtype=np.float64, causal_align="bottom_right"):
    """Multi-head attention and its VJP by explicit loops, in ``dtype``; returns ``(output, grads)``.

    query (B, T, E), key (B, S, kdim), value (B, S, vdim), d_out (B, T, E); masks in this project's
    semantics (bool True = may attend, float added with -inf hiding, key_mask (B, S), causal and window
    aligned at the end); head_mask (H,) or (B, H); ``dropout`` a multiplier (B, H, T, S) of the weights
    (0 or 1/(1-p)); the layer features ``softcap`` c (logits c tanh(l / c) before the additive mask),
    ``qk_norm`` eps (RMSNorm of each query and key head with the weights' q_norm, k_norm, before RoPE)
    and the weights' ``sinks`` (H,) (one more term exp(sink_h) in each row's softmax, no value);
    ``causal_align`` "bottom_right" (this project's) or "top_left" (a declared convention,
    mha.testing.conventions). ``grads`` maps "query", "key", "value" (each argument taken as a separate
    input) and the weight names of :class:`mha.AttentionWeights` (None where absent) to arrays of
    ``dtype``. A query that sees no key has zero weights, context and gradients.
    """
    dt = np.dtype(dtype)
    w = {n: None if a is None else np.asarray(a, dt) for n, a in weights.to_dict().items()}
    xq, xk, xv, dy = (np.asarray(a, dt) for a in (query, key, value, d_out))
    H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
    B, T, _ = xq.shape
    S = xk.shape[1]
    s = dt.type(1.0 / math.sqrt(D) if scale is None else scale)
    vis = visible_keys(B, H, T, S, mask=mask, key_mask=key_mask, causal=causal, window=window,
                       causal_align=causal_align)
    add = additive(B, H, T, S, mask).astype(dt)
    drop = np.ones((B, H, T, S), dt) if dropout is None else np.broadcast_to(np.asarray(dropout, dt), (B, H, T, S))
    hm = np.ones((B, H), dt) if head_mask is None else \
        np.broadcast_to(np.asarray(head_mask, dt).reshape(-1, H), (B, H))
    g = {n: None if a is None else np.zeros_like(a) for n, a in w.items()}
    g.update(query=np.zeros_like(xq), key=np.zeros_like(xk), value=np.zeros_like(xv))
    out = np.zeros((B, T, w["o_weight"].shape[0]), dt)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            rq, rk = slice(h * D, (h + 1) * D), slice(kv * D, (kv + 1) * D)
            (q, q0), (k, k0), (v, _) = (_head(x[b], w, n, r, qk_norm) for x, n, r in
                                        ((xq, "q", rq), (xk, "k", rk), (xv, "v", rk)))
            if rope is not None:
                q, k = _rotate(q, rope, S - T, 1.0), _rotate(k, rope, 0, 1.0)
            dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
            ctx = np.zeros((T, D), dt)
            wo = w["o_weight"][:, rq]  # (E, D)
            sink = None if w.get("sinks") is None else w["sinks"][h]
            for i in range(T):
                seen = np.flatnonzero(vis[b, h, i])
                if seen.size == 0:
                    continue
                dctx = hm[b, h] * (dy[b, i] @ wo)  # (D,)
                ctx[i], dz, dsink, dv_seen = _row(q[i], k[seen], v[seen], add[b, h, i, seen], drop[b, h, i, seen],
                                                  dctx, s, softcap, sink)
                dv[seen] += dv_seen
                dq[i] += s * (dz @ k[seen])
                dk[seen] += s * np.outer(dz, q[i])
                if sink is not None:
                    g["sinks"][h] += dsink
            out[b] += (hm[b, h] * ctx) @ wo.T
            g["o_weight"][:, rq] += dy[b].T @ (hm[b, h] * ctx)
            if rope is not None:
                dq, dk = _rotate(dq, rope, S - T, -1.0), _rotate(dk, rope, 0, -1.0)
            if qk_norm is not None:
                dq, dk = _norm_vjp(q0, w["q_norm"], qk_norm, dq, g["q_norm"]), \
                    _norm_vjp(k0, w["k_norm"], qk_norm, dk, g["k_norm"])
            _projections_vjp(g, w, (xq[b], xk[b], xv[b]), (dq, dk, dv), (rq, rk, rk), vis[b, h], b)
    if w["o_bias"] is not None:
        out += w["o_bias"]
        g["o_bias"] = dy.sum((0, 1))
    return out, g


def _head(x, w, name: str, rows, qk_norm):
    """(head (L, D), before the norm): a projection's rows of one head, RMS-normalised for q and k with
    qk_norm (its weights q_norm / k_norm)."""
    y = x @ w[f"{name}_weight"][rows].T + (0 if w[f"{name}_bias"] is None else w[f"{name}_bias"][rows])
    if qk_norm is None or name == "v":
        return y, y
    return y / np.sqrt((y * y).mean(-1, keepdims=True) + y.dtype.type(qk_norm)) * w[f"{name}_norm"], y


def _norm_vjp(x, weight, eps: float, dy, dweight):
    """dx of y = x / rms(x) * weight row by row through its Jacobian J_ij = weight_i (delta_ij - x_i x_j /
    (D rms^2)) / rms built as a matrix; adds this head's gradient of ``weight`` into ``dweight``."""
    D = x.shape[-1]
    dx = np.zeros_like(x)
    for r in range(x.shape[0]):
        rms = np.sqrt((x[r] * x[r]).mean() + x.dtype.type(eps))
        J = weight[:, None] * (np.eye(D, dtype=x.dtype) - np.outer(x[r], x[r]) / (D * rms * rms)) / rms
        dx[r] = J.T @ dy[r]
        dweight += dy[r] * x[r] / rms
    return dx


@np.errstate(invalid="ignore")  # OpenBLAS's small float32 GEMV may raise the flag on lanes past a row's end
def _row(q, k, v, add, zd, dctx, s, softcap, sink):
    """One query row against its visible keys: (context (D,), d logits (n,), d sink, dv rows (n, D)), the
    softmax's Jacobian diag(p) - p p^T built whole over the keys (and the sink, a last entry without value).
    Its values are what the properties compare, so a NaN here fails them by value; the invalid-operation
    flag alone is ignored: finite (n, 5) @ (5,) products in float32 raised it now and then in CI (a
    RuntimeWarning under pytest's warnings-as-errors, not reproduced on replay), the known kind of
    OpenBLAS kernel that sets FE_INVALID on finite data (numpy#24067, OpenBLAS#1924)."""
    raw = np.array([s * (q @ kj) for kj in k], q.dtype)
    logit = raw if softcap is None else softcap * np.tanh(raw / softcap)
    z = logit + add if sink is None else np.append(logit + add, sink)
    e = np.exp(z - z.max())
    p = e / e.sum()
    pk = p[: len(k)] * zd  # the weights of the keys, dropout applied
    dp = np.zeros_like(p)
    dp[: len(k)] = (v @ dctx) * zd
    dz = (np.diag(p) - np.outer(p, p)) @ dp
    dlogit = dz[: len(k)] if softcap is None else dz[: len(k)] * (1 - np.tanh(raw / softcap) ** 2)
    return pk @ v, dlogit, (dz[-1] if sink is not None else 0.0), np.outer(pk, dctx)


def _projections_vjp(g, w, xs, ds, rows, vis, b: int) -> None:
    """Add one head's projection gradients into ``g``: weights, biases and the inputs of batch element b.
    Only rows that reach the output (queries that see a key, keys some query sees) touch the weights."""
    reach = {"q": vis.any(1), "k": vis.any(0), "v": vis.any(0)}
    for name, x, d, r in zip("qkv", xs, ds, rows):
        g[f"{name}_weight"][r] += d[reach[name]].T @ x[reach[name]]
        if g[f"{name}_bias"] is not None:
            g[f"{name}_bias"][r] += d.sum(0)
        g[{"q": "query", "k": "key", "v": "value"}[name]][b] += d @ w[f"{name}_weight"][r]


def magnitudes(weights: AttentionWeights, query, key, value, d_out, P, *, mask=None, head_mask=None, scale=None,
               dropout=None, max_angle: float = 0.0, qk_norm=None) -> dict:
    """Per gradient name, M: the scale of a float32 gradient's rounding error (the gradients' T1 magnitude).

    The backward run on absolute values: |x| |W|^T + |b| projections, the exact weights P (B, H, T, S),
    |J| |dp| <= p |dp| + p sum_k p_k |dp_k| for the softmax's Jacobian, every product of magnitudes; then
    the largest entry of each gradient so bounded, times the logit factor 1 + s max||q|| max||k|| + max|A|
    (a logit's rounding, relative to which every weight moves; tolerance.magnitude's Cauchy-Schwarz form,
    grown by RoPE as there). With ``qk_norm`` the normalised heads are bounded by sqrt(D) |w| and the
    gradient through the norm by 2 |w| / rms of each row; with sinks, d sink by sum_i sum_j p_ij |dp_ij|."""
    from .tolerance import _abs_projections, mask_term, rope_factor

    H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
    G = H // Hkv
    s = abs(1.0 / math.sqrt(D) if scale is None else float(scale))
    w = {n: None if a is None else np.abs(np.asarray(a, np.float64)) for n, a in weights.to_dict().items()}
    xq, xk, xv, dy = (np.abs(np.asarray(a, np.float64)) for a in (query, key, value, d_out))
    qs, ks, vs = _abs_projections(weights, query, key, value)  # per head: (B, L, D)
    B, T = xq.shape[:2]
    P = np.nan_to_num(np.asarray(P, np.float64))
    Pz = P if dropout is None else P * np.abs(np.asarray(dropout, np.float64))
    hm = np.ones((B, H)) if head_mask is None else \
        np.broadcast_to(np.abs(np.asarray(head_mask, np.float64)).reshape(-1, H), (B, H))
    M = {n: np.zeros_like(a) for n, a in w.items() if a is not None}
    M.update(query=np.zeros_like(xq), key=np.zeros_like(xk), value=np.zeros_like(xv))
    through = None  # with qk_norm: the gradient's growth through the q/k norm, per head and row (B, L, 1)
    if qk_norm is not None and w.get("q_norm") is not None:
        through = {}
        from .oracle import head_projections

        raw = head_projections(weights, query, key, value)[:2]
        for name, heads, n in (("q", qs, H), ("k", ks, Hkv)):
            rms = [np.sqrt((r * r).mean(-1, keepdims=True) + qk_norm) for r in raw[name == "k"]]
            top = float(w[f"{name}_norm"].max(initial=0.0))
            through[name] = [2 * top / r for r in rms]
            heads[:] = [np.broadcast_to(math.sqrt(D) * w[f"{name}_norm"], a.shape) for a in heads]
    for h in range(H):
        g, rq, rk = h // G, slice(h * D, (h + 1) * D), slice((h // G) * D, (h // G + 1) * D)
        dctx = hm[:, h, None, None] * (dy @ w["o_weight"][:, rq])  # (B, T, D)
        dv = np.einsum("bts,btd->bsd", Pz[:, h], dctx)
        dp = np.einsum("bsd,btd->bts", vs[g], dctx) * (Pz[:, h] / np.where(P[:, h] > 0, P[:, h], 1))
        dz = P[:, h] * (dp + (P[:, h] * dp).sum(-1, keepdims=True))
        dq, dk = s * dz @ ks[g], s * np.einsum("bts,btd->bsd", dz, qs[h])
        if "sinks" in M:
            M["sinks"][h] += (P[:, h] * dp).sum()
        if through is not None:
            M["q_norm"] += math.sqrt(D) * dq.sum((0, 1))
            M["k_norm"] += math.sqrt(D) * dk.sum((0, 1))
            dq, dk = dq * through["q"][h], dk * through["k"][g]
        M["o_weight"][:, rq] += np.einsum("bte,btd->ed", dy, hm[:, h, None, None] * np.abs(_ctx(Pz[:, h], vs[g])))
        for name, x, d, rows in (("q", xq, dq, rq), ("k", xk, dk, rk), ("v", xv, dv, rk)):
            M[f"{name}_weight"][rows] += np.einsum("bld,ble->de", d, x)
            if f"{name}_bias" in M:
                M[f"{name}_bias"][rows] += d.sum((0, 1))
            M[{"q": "query", "k": "key", "v": "value"}[name]] += d @ w[f"{name}_weight"][rows]
    if "o_bias" in M:
        M["o_bias"] = dy.sum((0, 1))
    qn = max(float(np.linalg.norm(q, axis=-1).max(initial=0.0)) for q in qs)
    kn = max(float(np.linalg.norm(k, axis=-1).max(initial=0.0)) for k in ks)
    factor = 1.0 + s * qn * kn * rope_factor(max_angle) + mask_term(mask)
    return {n: factor * float(a.max(initial=0.0)) for n, a in M.items()}


def _ctx(P, v):
    """(B, T, D) = P (B, T, S) @ v (B, S, D)."""
    return P @ v


def tolerances(g32: dict, g64: dict, M: dict, factor: float = FACTOR) -> dict:
    """Per gradient name, the bound of the module docstring: factor * (max|g32 - g64| + u32 M)."""
    out = {}
    for n, a in g64.items():
        if a is None:
            continue
        err = float(np.nanmax(np.abs(np.asarray(g32[n], np.float64) - np.asarray(a, np.float64)), initial=0.0))
        out[n] = factor * (err + _U32 * M[n])
    return out


def assert_gradients_close(actual: dict, g64: dict, tol: dict, what: str = "") -> None:
    """Each gradient in ``actual`` within ``tol`` of ``g64`` (NaN where g64 is NaN), with the worst
    element named."""
    from .tolerance import assert_close

    for n, ref in g64.items():
        if ref is None:
            if actual.get(n) is not None:
                raise AssertionError(f"{what} {n}: expected None (no such parameter), got an array")
            continue
        if actual.get(n) is None:
            raise AssertionError(f"{what} {n}: missing")
        assert_close(actual[n], ref, tol[n], f"{what} gradient of {n}".strip(),
                     detail=f"bound {FACTOR:g} x the float32 oracle's own error")


def directional(forward, grads: dict, primals: dict, rng: np.random.Generator, eps: float = 1e-4):
    """(<c, J t> by central differences, <J^T c, t> from ``grads``, a scale for their difference).

    ``primals``: name -> float64 array (inputs and weights); ``forward(primals) -> y`` in float64;
    ``grads``: name -> the gradients of <c, y> under test, c the cotangent they were computed for, passed
    as primals["__cotangent__"]. t is a random unit-variance direction over every primal."""
    c = primals["__cotangent__"]
    names = [n for n, a in primals.items() if n != "__cotangent__" and a is not None]
    t = {n: rng.normal(size=np.shape(primals[n])) for n in names}

    def moved(sign):
        return {n: (a if n not in t else a + sign * eps * t[n]) for n, a in primals.items()}

    fd = float(np.sum(c * (forward(moved(1.0)) - forward(moved(-1.0))))) / (2 * eps)
    an = float(sum(np.sum(np.asarray(grads[n], np.float64) * t[n]) for n in names))
    size = float(sum(np.sum(np.abs(np.asarray(grads[n], np.float64) * t[n])) for n in names))
    return fd, an, size
