r"""Tolerances derived from the arithmetic, not guessed.

One evaluation in a dtype with unit roundoff :math:`u` differs from the exact (float64) result by at most

.. math::

    T_1 = C\,u\,M,\qquad
    M = \max|y| + \max|b_O| + \lVert W_O\rVert_\infty\,\max|v|\,\big(1 + s\,\max_i\lVert q_i\rVert_2\,\max_j\lVert k_j\rVert_2
        + \max|A|\big)

with :math:`q, k, v` the heads projected with absolute values, :math:`|x|\,|W|^\top + |b|` (which bound
both the projections and their rounding, also when the products cancel), :math:`s` the scale, :math:`A` the additive mask and
:math:`\lVert W_O\rVert_\infty` the largest absolute row sum of the output projection (times the largest
head-mask multiplier). The Cauchy-Schwarz factor bounds the rounding of each logit
:math:`\sum_d q_d k_d` by :math:`u\,s\,\lVert q\rVert\lVert k\rVert`; a logit error :math:`\delta` moves a
softmax-weighted mean of values by at most :math:`2\delta\max|v|`. Measured on this project's machines
the worst ratio error/(u M) was 0.69 over numpy/MLX float32, float16 and bfloat16, so :math:`C = 4`.
Two evaluations compared with each other get :math:`T_2 = T_1(a) + T_1(b)` (triangle inequality through
the exact value).

With RoPE the logit term grows by a factor :math:`1 + 2(\theta_{max} + 2)`: a rotation by an angle
computed as :math:`\theta(1 + \delta)`, :math:`|\delta| \le u`, with cosine and sine each rounded,
moves a pair by at most :math:`u(|\theta| + 2)` times its norm, in the query and in the key.
"""

from __future__ import annotations

import math

import numpy as np

from .oracle import head_projections

C = 4.0
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def unit_roundoff(dtype) -> float:
    name = getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]
    return UNIT_ROUNDOFF[name]


def rope_factor(max_angle: float) -> float:
    """The growth of the logit term under RoPE with angles up to ``max_angle`` (module docstring)."""
    return 1.0 if not max_angle else 1.0 + 2.0 * (abs(float(max_angle)) + 2.0)


def magnitude(weights, query, key=None, value=None, *, y_ref=None, scale=None, mask=None,
              head_mask=None, max_angle: float = 0.0, P_ref=None):
    """The scale M of the error bound for one layer call (see the module docstring): a float, or with
    ``P_ref`` (the exact weights, (B, H, T, S)) and an additive mask, M per output row, (B, T, 1), whose
    mask term is the row's own (:func:`mask_term`)."""
    key = query if key is None else key
    value = key if value is None else value
    qs, ks, vs = _abs_projections(weights, query, key, value)
    D = weights.head_dim
    s = abs(1.0 / math.sqrt(D) if scale is None else float(scale))
    qn = max(float(np.linalg.norm(q, axis=-1).max(initial=0.0)) for q in qs)
    kn = max(float(np.linalg.norm(k, axis=-1).max(initial=0.0)) for k in ks)
    vmax = max(float(np.abs(v).max(initial=0.0)) for v in vs)
    amax = mask_term(mask, P_ref)
    if np.ndim(amax):  # (B, H, T, 1) -> per output row: the worst of its heads
        amax = amax.max(axis=1)
    wo = float(np.abs(np.asarray(weights.o_weight, np.float64)).sum(axis=1).max(initial=0.0))
    if head_mask is not None:
        wo *= float(np.abs(np.asarray(head_mask, np.float64)).max(initial=0.0))
    ymax = 0.0 if weights.o_bias is None else float(np.abs(np.asarray(weights.o_bias, np.float64)).max())
    if y_ref is not None:  # NaN in a result under test must not turn the bound into NaN
        y = np.abs(np.asarray(y_ref, np.float64))
        ymax += float(y[np.isfinite(y)].max(initial=0.0))
    return ymax + wo * vmax * (1.0 + s * qn * kn * rope_factor(max_angle) + amax)


def _abs_projections(weights, query, key, value):
    """Per-head projections of |x| by |W| (plus |b|): they bound |q|, |k|, |v| *and* the rounding of
    each projection (u times these sums), which |q| alone misses when the products cancel."""
    from .. import AttentionWeights

    w = weights.to_dict()
    absw = AttentionWeights(**{n: None if a is None else np.abs(np.asarray(a, np.float64)) for n, a in w.items()},
                            num_heads=weights.num_heads, num_kv_heads=weights.num_kv_heads)
    return head_projections(absw, np.abs(np.asarray(query, np.float64)), np.abs(np.asarray(key, np.float64)),
                            np.abs(np.asarray(value, np.float64)))


def mask_term(mask, P_ref=None):
    """The additive mask's part of a logit's rounding error: max|A| over its finite entries (0 without a
    float mask); with ``P_ref``, the exact weights (B, H, T, S), each query row's own sum_j p_j |A_j|, as
    (B, H, T, 1).

    Adding A_j rounds the logit by u |A_j| at most, and logit errors d_j move the softmax mean by
    sum_j p_j (d_j - sum_k p_k d_k) v_j, at most 2 max|v| sum_j p_j |d_j|: a key whose weight is 0
    contributes nothing, whatever its bias. So the finfo(float32).min that Hugging Face puts on padding
    loosens the bound only for rows whose weight sits on such keys (a row whose every visible key
    carries it: float32 cannot tell its keys apart), not for every row of the call, as max|A| would."""
    if mask is None or np.asarray(mask).dtype.kind != "f":
        return 0.0
    m = np.abs(np.asarray(mask, dtype=np.float64))
    m = np.where(np.isfinite(m), m, 0.0)  # -inf hides its key (weight 0)
    if P_ref is None:
        return float(m.max(initial=0.0))
    P = np.asarray(P_ref, dtype=np.float64)
    # a row whose exact weights are NaN (a NaN input) is NaN in the output too, which assert_close checks
    # by position: its bound does not matter, and 0 keeps it from turning the others' into NaN
    return np.nan_to_num(P * m).sum(axis=-1, keepdims=True)


def weights_magnitude(weights, query, key=None, *, scale=None, mask=None, max_angle: float = 0.0, P_ref=None):
    """The scale M_P of the error bound for attention weights: a logit's rounding error is at most
    u (1 + s max||q|| max||k|| + |A_j|), which moves a softmax probability by at most twice that
    (relative, and the probabilities are <= 1), and normalising over S keys adds S u:
    M_P = S + 2 (1 + s max||q|| max||k|| + max|A|); with ``P_ref``, per query row (B, H, T, 1), the
    mask term that row's own (:func:`mask_term`: p_j |A_j| <= sum_k p_k |A_k|)."""

    key = query if key is None else key
    qs, ks, _ = _abs_projections(weights, query, key, np.zeros(np.shape(key)[:-1] + (weights.vdim,)))
    s = abs(1.0 / math.sqrt(weights.head_dim) if scale is None else float(scale))
    qn = max(float(np.linalg.norm(q, axis=-1).max(initial=0.0)) for q in qs)
    kn = max(float(np.linalg.norm(k, axis=-1).max(initial=0.0)) for k in ks)
    amax = mask_term(mask, P_ref)
    return np.shape(key)[-2] + 2.0 * (1.0 + s * qn * kn * rope_factor(max_angle) + amax)


def t1(dtype, M: float) -> float:
    """Bound for one evaluation in ``dtype`` against the exact result."""
    return C * unit_roundoff(dtype) * M


def t2(dtype_a, dtype_b, M: float) -> float:
    """Bound for two evaluations compared with each other."""
    return t1(dtype_a, M) + t1(dtype_b, M)


def assert_close(actual, expected, tol, what: str = "", detail: str = "") -> None:
    """``|actual - expected| <= tol`` (a float, or an array broadcastable to them: a bound per row), NaN
    positions agreeing, reporting the element furthest beyond its bound."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if not np.array_equal(nan_a, nan_e):
        idx = tuple(int(i) for i in np.argwhere(nan_a != nan_e)[0])
        raise AssertionError(f"{what}: NaN pattern differs first at {idx}: got {a[idx]}, expected {e[idx]}")
    diff = np.where(nan_a, 0.0, np.abs(a - e))
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), diff.shape)  # a bound per element, or one for all
    if diff.size and not (diff <= tol).all():
        excess = np.where(diff <= tol, -np.inf, np.where(tol > 0, diff / np.maximum(tol, 1e-300), np.inf))
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(excess), diff.shape))
        raise AssertionError(
            f"{what}: |difference| {diff[idx]:.3g} > tolerance {tol[idx]:.3g} at {idx} "
            f"(got {a[idx]!r}, expected {e[idx]!r}){'; ' + detail if detail else ''}"
        )
