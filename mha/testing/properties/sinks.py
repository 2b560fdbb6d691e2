"""Learned attention sinks (gpt-oss): a per-head logit s_h that joins every row's softmax denominator
with no value, so each row's weights over the real keys sum to 1 - exp(s_h - lse) (the sink's share)."""

from __future__ import annotations

import numpy as np

from .. import oracle
from ._common import call, close, edit_weights, magnitude, prop, rng_of, t1, weights_tol


def _sinks(p) -> np.ndarray:
    """(H,) sink logits around the size of the problem's own logits: some rows give the sink most of
    their weight, others little (drawn from the problem's seed)."""
    return rng_of(p, 41).normal(0.0, 3.0, p.config.H)


@prop("learned_sinks", requires=("sinks",), theme="sinks", positional=True)
def learned_sinks(impl, p):
    """y = MHA_64(x) with learned sinks within T1: exp(s_h) joins each row's softmax denominator and
    contributes no value, for sink logits s ~ N(0, 3^2) per head (an empty row's output is b_O, its
    weights 0). With "weights" also the weights within the oracle's bound: under the sink_weights
    convention "dropped" the (B, H, T, S) weights over the real keys (rows sum to 1 - the sink's share);
    under "column" (B, H, T, S + 1) whose last column is that share.
    """
    s = _sinks(p)
    w = edit_weights(p.weights, sinks=s.astype(np.float32))
    rw = "weights" in impl.features
    y, P = call(impl, p, weights=w, return_weights=rw)
    k, v = p.kv
    y_ref, P_ref = oracle.attention(w, p.query, k, v, **p.masks(), **p.oracle_options())  # w.sinks: the sink term
    close(y, y_ref, t1(magnitude(p, y_ref, weights=w, P_ref=P_ref)), "output with sinks vs float64 oracle")
    if not rw:
        return
    tol = weights_tol(p, weights=w, evaluations=1, P_ref=P_ref)
    if p.convention("sink_weights") == "column":
        share = 1.0 - P_ref.sum(-1, keepdims=True)
        share = np.where(P_ref.any(-1, keepdims=True), share, 1.0)  # an empty row: all to the sink
        close(P[..., :-1], P_ref, tol, "weights over the real keys vs float64 oracle")
        close(P[..., -1:], share, tol, "the sink's column vs float64 oracle")
    else:
        close(P, P_ref, tol, "weights (sink column dropped) vs float64 oracle")
