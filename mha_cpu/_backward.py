r"""The numpy backend's gradients: ``mha.vjp`` analytically, from the forward's log-sum-exp, blockwise.

Forward (kept for the backward: the inputs, the projected heads q, k, v after RoPE, each head's context
O and the log-sum-exp, all O(B T E); never the (T, S) weights)::

    q, k, v = x_q W_q^T + b_q, ...             # (B, T, H, D), (B, S, Hkv, D); q then times the scale s
    q, k = rope(q), rope(k)
    O, lse = attend(q, k, v, masks)             # (B, T, H, D), (B, H, T): the backend's core, blockwise
    y = concat_h(m_h O_h) W_O^T + b_O           # head_mask m

Backward, for the cotangent dy::

    dW_O = dy^T concat(m O); db_O = sum dy; dO_h = m_h (dy W_O)_h
    dq, dk, dv = attention_backward(...)        # mha_cpu._backward_core: FlashAttention-2's recurrence
    dq, dk = rope^T(s dq), rope^T(dk)           # the rotation's transpose: the opposite angle
    dx = dq W_q; dW_q = dq^T x; db_q = sum dq   # and alike for k, v

Non-finite numbers: an input row whose projection gets no gradient (a key hidden from every query, a
query that sees no key) never reaches a weight's gradient, so NaN at hidden positions stays isolated as
in the forward; a NaN a query sees makes every gradient that query reaches NaN.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from mha import _vjp
from mha._reference import rms_norm
from mha._rope import apply_rope

from ._kernel import attend
from ._backward_core import attention_backward
from ._options import options
from ._workers import Workers


@dataclass
class Saved:
    """What the forward keeps: inputs (B, ·, ·), heads q (B, T, H, D), k, v (B, S, Hkv, D) after RoPE, contexts O (B, T, H, D) before head_mask, lse (B, H, T), and the call's masks, head_mask
    (B|1, 1, H, 1), dropout (B, H, T, S) or None, RoPE offsets, and with qk_norm q, k before the norm."""

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
    raw: tuple | None = None  # with qk_norm: q, k before the norm
    fused: tuple | None = None  # self-attention: the stacked q/k/v projection (W, b)


def vjp(layer, query, key, value, call_kwargs):
    """mha.vjp on a numpy layer (see mha._vjp.vjp)."""
    call = _vjp.prepare(layer, query, key, value, call_kwargs)
    small = _small(layer, call)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"), small():
        out, saved = forward(layer, call)
    shape = out.shape if call.batched else out.shape[1:]
    given = (key is not None, value is not None)

    def pull(d_out) -> _vjp.Gradients:
        d = _vjp.check_cotangent(layer, d_out, shape, call.batched)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"), small():
            dx, dparams = backward(layer, saved, d, total=not given[0])
        return _vjp.gradients(layer, call, given, dx, dparams)

    return (out if call.batched else out[0]), pull


def _small(layer, call):
    """A context for the call's arithmetic: below ``options.parallel_flops`` the backend's Workers on the
    calling thread alone, which hold BLAS at ``options.blas_threads`` (its threads cost more than they give
    on small products, the more so when the cores are busy), else nothing (large GEMMs take BLAS's
    threads; the attention its workers)."""
    c = layer.config
    B, T, S = call.shape
    HD, KD = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    flops = 2.0 * B * (2 * T * c.embed_dim * HD + S * (c.kdim + c.vdim) * KD + 2 * T * S * HD)
    return (lambda: Workers(flops)) if flops < options.parallel_flops else contextlib.nullcontext


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
    if call.self_attention:  # one GEMM for the three projections; q, k, v views of its output
        fused = _fused(p)
        y = _linear(xq, *fused)
        HD, KD = H * D, Hkv * D
        q, k, v = (y[..., :HD].reshape(B, T, H, D), y[..., HD:HD + KD].reshape(B, S, Hkv, D),
                   y[..., HD + KD:].reshape(B, S, Hkv, D))
    else:
        fused = None
        q = _linear(xq, p["q_weight"], p["q_bias"]).reshape(B, T, H, D)
        k = _linear(xk, p["k_weight"], p["k_bias"]).reshape(B, S, Hkv, D)
        v = _linear(xv, p["v_weight"], p["v_bias"]).reshape(B, S, Hkv, D)
    offsets = (call.pos.q_offset, call.pos.k_offset)
    raw = None
    if c.qk_norm is not None:  # RMSNorm of every query and key head over D, learned weights
        raw = q, k
        q, k = (rms_norm(np, a, p[f"{n}_norm"], c.qk_norm) for a, n in ((q, "q"), (k, "k")))
    if c.rope is not None:
        q, k = (_rope(a, c.rope, o) for a, o in ((q, offsets[0]), (k, offsets[1])))
    ctx, lse = _attend(q, k, v, call.masks, c.effective_scale, call.dropout, c.softcap, p.get("sinks"))
    hm = None if call.head_mask is None else call.head_mask.reshape(-1, 1, H, 1)
    merged = (ctx if hm is None else ctx * hm).reshape(B, T, H * D)
    out = _linear(merged, p["o_weight"], p["o_bias"])
    return out, Saved(xq, xk, xv, q, k, v, ctx, lse, call.masks, hm, call.dropout, offsets, raw, fused)


def _fused(p) -> tuple:
    """(W, b): the q, k and v projections stacked, ((H + 2 Hkv) D, E) and its bias or None."""
    w = np.concatenate([p["q_weight"], p["k_weight"], p["v_weight"]])
    return w, None if p["q_bias"] is None else np.concatenate([p["q_bias"], p["k_bias"], p["v_bias"]])


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


def _attend(q, k, v, masks, scale: float, dropout, softcap=None, sinks=None):
    """(O (B, T, H, D), lse (B, H, T)) for queries q (B, T, H, D) and k, v (B, S, Hkv, D): the
    backend's attention core (mha_cpu.attend), as the layer runs it; no query or no key: zero contexts and
    lse -inf (the layer's "empty" route)."""
    B, T, H, D = q.shape
    if B == 0 or T == 0 or k.shape[1] == 0:
        lse = np.full((B, H, T), -np.inf, q.dtype) if sinks is None else \
            np.broadcast_to(np.asarray(sinks, q.dtype)[None, :, None], (B, H, T)).copy()
        return np.zeros_like(q), lse
    ctx, lse = attend(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), masks, scale=scale,
                      dropout=dropout, softcap=softcap, sinks=sinks)
    return np.ascontiguousarray(ctx.transpose(0, 2, 1, 3)), lse


def backward(layer, s: Saved, d_out, total: bool = False):
    """((dx_q, dx_k, dx_v), {name: gradient}) for the cotangent d_out (B, T, E); ``total`` (self-attention
    with key and value omitted): (dx, None, None), the one input's gradient in all three roles."""
    c, p = layer.config, layer._native_params()
    H, D = c.num_heads, c.head_dim
    B, T = s.q.shape[:2]
    merged = (s.ctx if s.head_mask is None else s.ctx * s.head_mask).reshape(B * T, H * D)
    dy = d_out.reshape(B * T, d_out.shape[2])
    grads = {"o_weight": np.matmul(dy.T, merged), "o_bias": None if p["o_bias"] is None else _sum_rows(dy)}
    dctx = np.matmul(dy, p["o_weight"]).reshape(B, T, H, D)
    if s.head_mask is not None:
        dctx *= s.head_mask
    dq, dk, dv, dsinks = attention_backward(s.q, s.k, s.v, s.ctx, s.lse, dctx, s.masks, s.dropout,
                                            c.softcap, p.get("sinks"), c.effective_scale)
    dq *= dq.dtype.type(c.effective_scale)
    if c.rope is not None:
        dq, dk = _rope(dq, c.rope, s.offsets[0], True), _rope(dk, c.rope, s.offsets[1], True)
    if s.raw is not None:
        dq, grads["q_norm"] = rms_norm_backward(s.raw[0], p["q_norm"], c.qk_norm, dq)
        dk, grads["k_norm"] = rms_norm_backward(s.raw[1], p["k_norm"], c.qk_norm, dk)
    if dsinks is not None:
        grads["sinks"] = dsinks.astype(dq.dtype)
    if total and s.fused is not None:  # one GEMM each for the stacked weights' gradient and the input's
        d2 = np.concatenate([dq, dk, dv], axis=2).reshape(B * T, -1)  # (rows, (H + 2 Hkv) D)
        x2 = _isolated(s.xq.reshape(B * T, s.xq.shape[2]), d2)
        parts = np.cumsum([0, dq.shape[2] * D, dk.shape[2] * D, dv.shape[2] * D])
        gw, gb = np.matmul(d2.T, x2), (None if p["q_bias"] is None else _sum_rows(d2))
        for i, name in enumerate("qkv"):
            grads[f"{name}_weight"] = gw[parts[i]:parts[i + 1]]
            grads[f"{name}_bias"] = None if gb is None else gb[parts[i]:parts[i + 1]]
        return (np.matmul(d2, s.fused[0]).reshape(s.xq.shape), None, None), grads
    dx = []
    for name, x, dh in (("q", s.xq, dq), ("k", s.xk, dk), ("v", s.xv, dv)):
        d2 = dh.reshape(x.shape[0] * x.shape[1], dh.shape[2] * dh.shape[3])  # (rows, heads * D)
        x2 = _isolated(x.reshape(d2.shape[0], x.shape[2]), d2)
        grads[f"{name}_weight"] = np.matmul(d2.T, x2)
        grads[f"{name}_bias"] = None if p[f"{name}_bias"] is None else _sum_rows(d2)
        dx.append(np.matmul(d2, p[f"{name}_weight"]).reshape(x.shape))
    return tuple(dx), grads


def rms_norm_backward(x, w, eps: float, dy):
    """(dx, dw) of y = x / sqrt(mean(x^2) + eps) * w over the last axis (D), for x, dy (..., D), w (D,):
    with x_hat = x / rms and g = dy w, dx = (g - x_hat mean(g x_hat)) / rms and dw = sum over rows of
    dy x_hat. Computed on x scaled by a power of two near its largest entry (exact), as the forward, so
    that no square overflows."""
    top = np.abs(x).max(axis=-1, keepdims=True)
    p = np.where(top > 0, np.exp2(np.ceil(np.log2(np.where(top > 0, top, 1)))), 1).astype(x.dtype)
    y = x / p
    r = 1 / np.sqrt((y * y).mean(axis=-1, keepdims=True) + eps / (p * p))  # rms(x) = p / r
    x_hat = y * r
    g = dy * w
    dx = (g - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)) * (r / p)
    dw = (dy * x_hat).reshape(-1, x.shape[-1]).sum(axis=0, dtype=np.float64).astype(x.dtype)
    return dx, dw


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
