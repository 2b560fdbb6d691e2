"""Invariances of the arithmetic: key bias, value bias, linearity in the values, the scale."""

from __future__ import annotations

import math

import numpy as np

from ... import AttentionWeights
from .. import oracle
from ..oracle import head_projections
from ._common import (call, close, edit_weights, empty_row_weights, empty_rows, magnitude, prop, replace, rng_of, t1,
                      t2)


@prop("key_bias_invariance", requires=("bias",), theme="invariances")
def key_bias_invariance(impl, p):
    """Adding delta to the key bias shifts every logit of a row by the same q_i . delta, which the
    softmax ignores: f(b_k + delta) = f(b_k), for |delta| up to ~100 (T2, M from the shifted keys)."""
    if p.weights.k_bias is None:
        return
    rng = rng_of(p, 13)
    sigma = float(rng.choice([3.0, 30.0, 100.0]))
    delta = (sigma * rng.normal(size=p.weights.k_bias.shape)).astype(np.float32)
    w2 = edit_weights(p.weights, k_bias=p.weights.k_bias + delta)
    y, _ = call(impl, p)
    y2, _ = call(impl, p, weights=w2)
    close(y2, y, t2(magnitude(p, y, weights=w2)), f"output after shifting the key bias (sigma={sigma})")


@prop("value_bias_affinity", requires=("bias",), theme="invariances")
def value_bias_affinity(impl, p):
    """Weights sum to one over visible keys, so a value-bias change delta moves each output by the
    same amount: f(b_v + delta) - f(b_v) = concat_h(delta_{g(h)}) W_O^T on queries that see a key, and 0
    on those that see none (in a head: that head contributes 0; all of delta under the empty-row
    convention "mean_value", NaN under "nan"). T2, absolute."""
    if p.weights.v_bias is None:
        return
    rng = rng_of(p, 14)
    delta = rng.normal(size=p.weights.v_bias.shape).astype(np.float32)
    w2 = edit_weights(p.weights, v_bias=p.weights.v_bias + delta)
    y, _ = call(impl, p)
    y2, _ = call(impl, p, weights=w2)
    H, G, D = p.config.H, p.config.H // p.config.Hkv, p.config.D
    empty = empty_rows(p)  # (B, H, T)
    seen = np.where(empty, {"output_bias": 0.0, "mean_value": 1.0}.get(p.convention("empty_row"), np.nan), 1.0)
    d = np.stack([delta[(h // G) * D:(h // G + 1) * D] for h in range(H)]).astype(np.float64)  # (H, D)
    ctx = seen[..., None] * d[None, :, None, :]  # (B, H, T, D)
    shift = np.concatenate(list(np.moveaxis(ctx, 1, 0)), axis=-1) @ p.weights.o_weight.astype(np.float64).T
    M = max(magnitude(p, y), magnitude(p, y2, weights=w2))
    close(y2 - y, shift, t2(M), "output change from a value-bias change")


@prop("value_linearity", requires=("cross",), theme="invariances", self_attention=False)
def value_linearity(impl, p):
    """Attention is linear in the values: with b_v = 0, f(a v1 + b v2) - b_O = a (f(v1) - b_O)
    + b (f(v2) - b_O) for a, b in [-2, 2]. Bound T1 (1 + |a| + |b|)."""
    w = p.weights if p.weights.v_bias is None else edit_weights(p.weights, v_bias=np.zeros_like(p.weights.v_bias))
    rng = rng_of(p, 15)
    a, b = (float(x) for x in rng.uniform(-2, 2, size=2))
    k, v1 = p.kv
    v2 = rng.normal(size=v1.shape).astype(np.float32)
    v12 = (a * v1.astype(np.float64) + b * v2).astype(np.float32)
    bo = 0.0 if w.o_bias is None else w.o_bias.astype(np.float64)
    y1, _ = call(impl, p, weights=w, value=v1)
    y2, _ = call(impl, p, weights=w, value=v2)
    y12, _ = call(impl, p, weights=w, value=v12)
    M = max(magnitude(p, y1, weights=w, value=v) for v in (v1, v2, v12))
    close(y12 - bo, a * (y1 - bo) + b * (y2 - bo), (1 + abs(a) + abs(b)) * t1(M), "linearity in the values")


@prop("zero_scale_mean", requires=("scale",), theme="invariances")
def zero_scale_mean(impl, p):
    """scale = 0 makes every visible logit equal (additive masks aside): each query averages the values
    it may see. Checked without additive masks: y = mean_{visible j}(v_j) W_O^T + b_O, b_O alone on
    empty rows (or as the empty-row convention says). T1."""
    if p.mask is not None and p.mask.dtype.kind == "f":
        p = replace(p, mask=p.mask != -np.inf)
    y, _ = call(impl, p, scale=0.0)
    k, v = p.kv
    _, _, vs = head_projections(p.weights, p.query, k, v)
    vis = p.visible().astype(np.float64)  # (B, H, T, S)
    cnt = vis.sum(-1, keepdims=True)
    P = empty_row_weights(p, np.divide(vis, cnt, out=np.zeros_like(vis), where=cnt > 0))
    G = p.config.H // p.config.Hkv
    ctx = np.concatenate([P[:, h] @ vs[h // G] for h in range(p.config.H)], axis=-1)
    expected = ctx @ p.weights.o_weight.astype(np.float64).T + (0.0 if p.weights.o_bias is None else p.weights.o_bias)
    close(y, expected, t1(magnitude(p, y, scale=0.0)), "scale=0 output vs the mean of visible values")


@prop("default_scale", requires=("scale",), theme="invariances", min_head_dim=2, min_heads=2)
def default_scale(impl, p):
    """The default scale is 1/sqrt(D) with D the head width (not E, not 1/D): f(scale=None) =
    f(scale=1/sqrt(D)). T2."""
    y, _ = call(impl, p)
    y2, _ = call(impl, p, scale=1.0 / math.sqrt(p.config.D))
    close(y2, y, t2(magnitude(p, y)), "scale=None vs scale=1/sqrt(head_dim)")


@prop("scale_homogeneity", requires=("scale",), theme="invariances")
def scale_homogeneity(impl, p):
    """The scale multiplies the logits: multiplying W_q and b_q by c equals multiplying the scale by c,
    f(c W_q, c b_q; s) = f(W_q, b_q; c s) for c in [1/4, 4]. T2 (M at the larger logits). And at the
    extreme, with queries from another sequence (cross-attention): queries and b_q divided by 2^70 (exact)
    with the scale multiplied by 2^70 give the same logits, though scale * |W_q| is then far past what can
    be folded into W_q in float32 (an implementation that folds must carry the rest elsewhere, masks'
    biases included)."""
    rng = rng_of(p, 16)
    c = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
    s = 1.0 / math.sqrt(p.config.D)
    w = p.weights
    w2 = edit_weights(w, q_weight=(w.q_weight * c).astype(np.float32),
                      q_bias=None if w.q_bias is None else (w.q_bias * c).astype(np.float32))
    y, _ = call(impl, p, weights=w2, scale=s)
    y2, _ = call(impl, p, scale=c * s)
    M = max(magnitude(p, y, weights=w2, scale=s), magnitude(p, y2, scale=c * s))
    close(y, y2, t2(M) + 2 * t1(M), f"scale homogeneity (c={c:.3g})")
    if not p.config.self_attention:
        _scale_extreme(impl, _biased(impl, p, rng), s)


def _biased(impl, p, rng):
    """``p`` with an additive mask of N(0, 1) biases when the implementation takes one and ``p`` has no
    mask (a drawn one is kept as it is)."""
    if "additive_mask" not in impl.features or p.mask is not None:
        return p
    c = p.config
    return replace(p, mask=rng.normal(size=(c.B, 1, c.T, c.S)).astype(np.float32))


def _scale_extreme(impl, p, s: float) -> None:
    """Queries and b_q divided by 2^70 with the scale times 2^70, against the float64 oracle at scale s,
    within each row's bound, on the rows that see a key in every head (empty rows have properties of
    their own, and an implementation may treat them one way with a bool mask, another with a bias)."""
    big = 2.0**70
    w = p.weights
    w3 = edit_weights(w, q_bias=None if w.q_bias is None else (w.q_bias / big).astype(np.float32))
    y3, _ = call(impl, p, weights=w3, query=(p.query / big).astype(np.float32), scale=s * big)
    k, v = p.kv
    y_ref, P_ref = oracle.attention(w, p.query, k, v, scale=s, **p.masks(), **p.oracle_options())
    rows = p.visible().any(axis=-1).all(axis=1)  # (B, T)
    M = np.broadcast_to(magnitude(p, y_ref, scale=s, P_ref=P_ref), y_ref.shape[:2] + (1,))
    close(y3[rows], y_ref[rows], t1(M[rows]), "queries and b_q / 2^70, the scale x 2^70")


@prop("hard_retrieval", theme="invariances", masks=False, num_heads=1, min_head_dim=3)
def hard_retrieval(impl, p):
    """With identity projections and orthonormal tokens, a query equal to alpha times a key with
    alpha * scale = 40 retrieves that key's value: y_i = v_{pi(i)} within T1 + S e^-40 max|v|. Pins the
    sign and the order of magnitude of the scale. (Self-attention: each token retrieves itself;
    with "cross", queries retrieve a random permutation of the keys.)"""
    E = p.config.E
    rng = rng_of(p, 17)
    L = min(p.config.T, E)
    basis = np.linalg.qr(rng.normal(size=(E, E)))[0][:L]  # L orthonormal rows
    alpha = 40.0 * math.sqrt(E)  # logit gap alpha / sqrt(E) = 40 with the default scale
    eye = np.eye(E, dtype=np.float32)
    w = AttentionWeights(eye * np.float32(alpha), eye, eye, eye, num_heads=1)
    keys = np.broadcast_to(basis, (p.config.B, L, E)).astype(np.float32)
    if "cross" in impl.features:
        perm = rng.permutation(L)
        query = keys[:, perm]
        y, _ = call(impl, p, weights=w, query=query, key=keys, value=keys, masks={})
        expected = keys[:, perm]
    else:
        y, _ = call(impl, p, weights=w, query=keys, key=keys, value=keys, masks={})
        expected = keys
    M = 2.0 + alpha / math.sqrt(E)  # max|y| + |W_O| max|v| (1 + s |q| |k|)
    close(y, expected, t1(M) + L * math.exp(-40.0), "hard retrieval of the matching value")
