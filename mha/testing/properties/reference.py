"""Property 1: the implementation equals the independent float64 oracle. It pins the scale, which
almost every metamorphic property is blind to."""

from __future__ import annotations

from .. import oracle
from ._common import call, close, magnitude, prop, t1, weights_tol


@prop("reference", theme="reference", positional=True)
def reference(impl, p):
    """y = MHA_64(x) within T1: the output equals the float64 per-head loop oracle (with the layer's RoPE,
    as complex rotations, and sliding window when the implementation has them).

    |y - y_64| <= 4 u M (M from tolerance.magnitude). With "weights" also |P - P_64| <= 2 S u + 4 u M.
    An additive mask's term in M is each row's own (tolerance.mask_term): a finite fill such as
    finfo(float32).min on keys of weight 0 leaves the bound of that row as tight as without it.
    """
    rw = "weights" in impl.features
    y, P = call(impl, p, return_weights=rw)  # with weights, the plain call is checked against it too
    k, v = p.kv
    y_ref, P_ref = oracle.attention(p.weights, p.query, k, v, **p.masks(), **p.oracle_options())
    M = magnitude(p, y_ref, P_ref=P_ref)  # per row with an additive mask
    close(y, y_ref, t1(M), "output vs float64 oracle")
    if rw:
        close(P, P_ref, weights_tol(p, evaluations=1, P_ref=P_ref), "weights vs float64 oracle")
