"""Logits inside float32's range, whatever the inputs: :func:`scaled_queries`, used by the fused and the
blockwise paths (the readable reference has its own rule, mha._reference.logit_factor)."""

from __future__ import annotations

import math

import mlx.core as mx

from ._compile import compiled

LIMIT = 100  # the scaled queries and the logits stay below 2^LIMIT in magnitude


def scaled_queries(q, k_top, scale: float):
    """(q', e): q' = q * scale / 2^e, with e >= 0 a whole number (a 0-d float32 without a gradient) such
    that |q'| and every logit q' . k stay below 2^LIMIT, far inside float32's range, for keys k whose
    entries are at most ``k_top`` (0-d) in magnitude (the finite ones: mha_mlx._nonfinite.scan).

    e = 0 (q' = q * scale, the queries as MLX's kernel scales them) unless scale * max|q| or
    scale * max|q| * max|k| * D could pass 2^LIMIT: finite inputs around 1e15 and beyond, or a scale near
    float32's largest. The kernels then attend to the logits divided by 2^e (the additive mask and the
    sinks divided alike, so that the ranking of the true logits holds): a softmax of finite numbers, a convex combination of the same visible values, where the logits
    themselves would overflow to inf - inf = NaN (and float32 could not tell such logits' weights apart:
    its rounding of each is far above 1). Only q is rescaled, by exact powers of two applied in halves
    (each factor stays a float32), so k is never copied.
    """
    if q.size == 0:  # B = 0: nothing to attend
        return q * scale, mx.array(0.0, mx.float32)
    D = q.shape[-1]
    # one graph for all lengths (decoding calls it with one more key at each step), per D and scale
    fn = compiled(("scaled_queries", D, float(scale)), lambda q, k_top: _scaled(q, k_top, float(scale), D),
                  shapeless=True)
    return fn(q, k_top)


def _scaled(q, k_top, scale: float, D: int):
    a, b = _log2_top(q), mx.log2(k_top.astype(mx.float32))  # log2 max|q|, log2 max|k| over finite entries
    ls = math.log2(abs(scale)) if scale else -math.inf
    e1 = mx.maximum(mx.ceil(a + ls - LIMIT), 0.0)  # |q * scale| / 2^e1 <= 2^LIMIT
    e2 = mx.maximum(mx.ceil(mx.minimum(a + ls, LIMIT) + b + math.log2(D) - LIMIT), 0.0)
    e1, e2 = mx.stop_gradient(e1), mx.stop_gradient(e2)
    qs = (times_pow2(q, -e1) * scale).astype(q.dtype)
    return times_pow2(qs, -e2).astype(q.dtype), e1 + e2


def times_pow2(x, n):
    """x * 2^n for a whole number n (0-d), |n| <= 254, exact where the result is a normal float: in two
    factors, each of which is a float32."""
    h = mx.ceil(n / 2)
    return x * (2.0**h) * (2.0 ** (n - h))


def _log2_top(x):
    """log2 of the largest finite |x| (-inf for none), a 0-d float32."""
    return mx.log2(mx.max(mx.abs(mx.where(mx.isfinite(x), x, 0))).astype(mx.float32))
