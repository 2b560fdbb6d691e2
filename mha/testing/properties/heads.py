"""Head bookkeeping: heads are independent, ordered only by W_O, groups in GQA are contiguous."""

from __future__ import annotations

import math

import numpy as np

from ... import AttentionWeights
from ._common import call, close, edit_weights, empty_row_weights, magnitude, prop, rng_of, t1, t2, weights_tol


@prop("head_decomposition", theme="heads", min_heads=2)
def head_decomposition(impl, p):
    """MHA is the sum of its heads: y - b_O = sum_h (y_h - b_O), where y_h runs the same layer with
    W_O zeroed outside head h's column block. (H + 1) T1."""
    y, _ = call(impl, p)
    H, D = p.config.H, p.config.D
    total = np.zeros_like(y)
    b = 0.0 if p.weights.o_bias is None else p.weights.o_bias.astype(np.float64)
    for h in range(H):
        wo = np.zeros_like(p.weights.o_weight)
        wo[:, h * D:(h + 1) * D] = p.weights.o_weight[:, h * D:(h + 1) * D]
        yh, _ = call(impl, p, weights=edit_weights(p.weights, o_weight=wo))
        total += yh - b
    close(total + b, y, (H + 1) * t1(magnitude(p, y)), "sum of single-head contributions")


def _head_order(rng, H: int, Hkv: int) -> np.ndarray:
    """A permutation of query heads that keeps GQA groups: permute the key/value heads, and the query
    heads inside each group."""
    G = H // Hkv
    kv = rng.permutation(Hkv)
    return np.concatenate([kv_h * G + rng.permutation(G) for kv_h in kv]), kv


def _rows(a, order, D):
    return None if a is None else np.concatenate([a[i * D:(i + 1) * D] for i in order], axis=0)


@prop("head_permutation", theme="heads", min_heads=2, positional=True)
def head_permutation(impl, p):
    """Heads are ordered only by W_O: permuting the head blocks of W_q (and the key/value heads of W_k,
    W_v, groups kept together) with the matching column blocks of W_O (and a per-head mask's head axis)
    leaves y unchanged (T2), and permutes the weights' head axis the same way."""
    H, Hkv, D = p.config.H, p.config.Hkv, p.config.D
    order, kv_order = _head_order(rng_of(p, 11), H, Hkv)
    w = p.weights
    w2 = edit_weights(
        w, q_weight=_rows(w.q_weight, order, D), q_bias=_rows(w.q_bias, order, D),
        k_weight=_rows(w.k_weight, kv_order, D), k_bias=_rows(w.k_bias, kv_order, D),
        v_weight=_rows(w.v_weight, kv_order, D), v_bias=_rows(w.v_bias, kv_order, D),
        o_weight=np.concatenate([w.o_weight[:, i * D:(i + 1) * D] for i in order], axis=1))
    masks = p.masks()
    if p.mask is not None and p.mask.ndim >= 3 and p.mask.shape[-3] > 1:  # a per-head mask moves with its head
        masks["mask"] = np.take(p.mask, order, axis=-3)
    rw = "weights" in impl.features
    y, P = call(impl, p, return_weights=rw)
    y2, P2 = call(impl, p, weights=w2, masks=masks, return_weights=rw)
    M = magnitude(p, y)
    close(y2, y, t2(M), "output after permuting heads")
    if rw:
        close(P2, P[:, order], weights_tol(p), "weights after permuting heads")


@prop("head_mask_scales_heads", requires=("head_mask",), theme="heads", min_heads=2)
def head_mask_scales_heads(impl, p):
    """head_mask multiplies each head's context before W_O: f(head_mask=c) = f with W_O's block h scaled
    by c_h; in particular c_h = 0 removes head h. T2."""
    rng = rng_of(p, 12)
    c = rng.normal(size=p.config.H).astype(np.float32)
    c[int(rng.integers(p.config.H))] = 0.0
    y, _ = call(impl, p, head_mask=c)
    wo = p.weights.o_weight.copy()
    D = p.config.D
    for h in range(p.config.H):
        wo[:, h * D:(h + 1) * D] *= c[h]
    y2, _ = call(impl, p, weights=edit_weights(p.weights, o_weight=wo))
    close(y, y2, t2(magnitude(p, y) * max(1.0, float(np.abs(c).max()))), "head_mask vs scaled W_O blocks")


@prop("single_head", theme="heads", num_heads=1)
def single_head(impl, p):
    """With H = 1 the layer is single-head attention with scale 1/sqrt(E):
    y = softmax_visible(Q K^T / sqrt(E) + A) V W_O^T + b_O, written with whole matrices (rows that see
    no key as the empty-row convention says). T1."""
    w, f = p.weights, np.float64
    y, _ = call(impl, p)
    k, v = p.kv

    def proj(x, W, b):
        return x.astype(f) @ W.astype(f).T + (0.0 if b is None else b)

    Q, K, V = proj(p.query, w.q_weight, w.q_bias), proj(k, w.k_weight, w.k_bias), proj(v, w.v_weight, w.v_bias)
    logits = Q @ np.swapaxes(K, 1, 2) / math.sqrt(w.embed_dim)  # (B, T, S)
    c = p.config
    vis = p.visible()[:, 0]  # (B, T, S)
    if p.mask is not None and p.mask.dtype.kind == "f":
        m = np.broadcast_to(p.mask.reshape((1,) * (4 - p.mask.ndim) + p.mask.shape), (c.B, 1, c.T, c.S))[:, 0]
        logits = logits + np.where(np.isneginf(m), 0.0, m)
    logits = np.where(vis, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    s = e.sum(-1, keepdims=True)
    P = np.divide(e, s, out=np.zeros_like(e), where=s > 0)
    P = empty_row_weights(p, P[:, None])[:, 0]  # the declared empty-row convention
    expected = proj(P @ V, w.o_weight, w.o_bias)
    close(y, expected, t1(magnitude(p, y)), "single head vs whole-matrix attention")


@prop("gqa_equals_repeated_kv", requires=("gqa",), theme="heads", min_heads=2, gqa=True, positional=True)
def gqa_equals_repeated_kv(impl, p):
    """Grouped-query attention is MHA with key/value heads repeated group-wise: query head h reads
    key/value head h // (H / Hkv). Repeating W_k, W_v (and biases) row blocks that way gives an MHA
    layer with the same output (T2) and weights."""
    w = p.weights
    G, D = p.config.H // p.config.Hkv, p.config.D

    def rep(a):
        return None if a is None else np.concatenate([a[(h // G) * D:(h // G + 1) * D] for h in range(p.config.H)])

    mha_w = AttentionWeights(w.q_weight, rep(w.k_weight), rep(w.v_weight), w.o_weight, w.q_bias, rep(w.k_bias),
                             rep(w.v_bias), w.o_bias, num_heads=p.config.H, num_kv_heads=p.config.H)
    rw = "weights" in impl.features
    y, P = call(impl, p, return_weights=rw)
    y2, P2 = call(impl, p, weights=mha_w, return_weights=rw)
    M = magnitude(p, y)
    close(y, y2, t2(M), "GQA vs MHA with repeated key/value heads")
    if rw:
        close(P, P2, weights_tol(p), "GQA weights vs MHA weights")
