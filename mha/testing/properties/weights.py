"""The attention weights returned: a probability distribution over the visible keys, and the very
weights that made the output."""

from __future__ import annotations

import numpy as np

from .. import tolerance
from ..oracle import head_projections
from ._common import call, close, identical, magnitude, prop, t2


@prop("weights_contract", requires=("weights",), theme="weights", positional=True)
def weights_contract(impl, p):
    """Weights are a distribution over the visible keys: shape (B, H, T, S); P >= 0; P = 0 exactly where
    a key is hidden; each row sums to 1 within 2 S u, or is all 0 when the query sees no key (all NaN
    under the empty-row convention "nan", 1/S on every key under "mean_value", unchecked under
    "unspecified")."""
    c = p.config
    _, P = call(impl, p, return_weights=True)
    if P.shape != (c.B, c.H, c.T, c.S):
        raise AssertionError(f"weights shape {P.shape}, expected (B, H, T, S) = {(c.B, c.H, c.T, c.S)}")
    vis = p.visible()
    empty = ~vis.any(-1)  # (B, H, T)
    conv = p.convention("empty_row")
    if conv != "output_bias":
        rows = P[empty]
        if conv == "nan" and not np.isnan(rows).all():
            raise AssertionError("weights of a query that sees no key are not all NaN (declared 'nan')")
        if conv == "mean_value":
            close(rows, np.full(rows.shape, 1.0 / c.S), 2 * c.S * tolerance.unit_roundoff("float32"),
                  "weights of a query that sees no key vs 1/S (declared 'mean_value')")
        P, vis = P[~empty], vis[~empty]  # (N, S): the rows that see a key
    if np.isnan(P).any():
        idx = tuple(int(i) for i in np.argwhere(np.isnan(P))[0])
        raise AssertionError(f"NaN weight at {idx} ({'b, h, t, s' if P.ndim == 4 else 'row, s'}); query sees "
                             f"{int(vis[idx[:-1]].sum())} keys")
    if not (P >= 0).all():
        raise AssertionError(f"negative weight {P.min()}")
    identical(P[~vis], np.zeros(int((~vis).sum())), "weights of hidden keys")
    sums = P.sum(-1)
    has = vis.any(-1)  # (B, H, T) or, with empty rows set aside, (N,)
    close(sums[has], np.ones(int(has.sum())), 2 * c.S * tolerance.unit_roundoff("float32"), "row sums")
    identical(sums[~has], np.zeros(int((~has).sum())), "row sums of queries that see no key")


@prop("weights_match_output", requires=("weights",), theme="weights", positional=True)
def weights_match_output(impl, p):
    """The weights returned made the output returned: y = concat_h(P_h V_{g(h)}) W_O^T + b_O with P from
    the same call and V the projected values (float64). T2."""
    y, P = call(impl, p, return_weights=True, same_call=True)
    k, v = p.kv
    _, _, vs = head_projections(p.weights, p.query, k, v)
    G = p.config.H // p.config.Hkv
    ctx = np.concatenate([P[:, h] @ vs[h // G] for h in range(p.config.H)], axis=-1)  # (B, T, H*D)
    expected = ctx @ p.weights.o_weight.astype(np.float64).T
    if p.weights.o_bias is not None:
        expected = expected + p.weights.o_bias
    close(y, expected, t2(magnitude(p, y)), "output vs concat(P V) W_O^T + b_O from the returned P")


@prop("weights_flag_invariance", requires=("weights",), theme="weights", positional=True)
def weights_flag_invariance(impl, p):
    """Asking for the weights never changes the output: f(x, return_weights=True)[0] = f(x) (T2, NaN
    where NaN), with a random head_mask when supported. Implementations often take a different code
    path (a fused kernel) without weights."""
    hm = None
    if "head_mask" in impl.features:  # both paths must honour head_mask the same way
        hm = np.random.default_rng([p.seed, 19]).normal(size=p.config.H).astype(np.float32)
    y, _ = call(impl, p, head_mask=hm)
    y_w, _ = call(impl, p, return_weights=True, same_call=True, head_mask=hm)
    M = magnitude(p, y, head_mask=hm)
    close(y, y_w, t2(M), "output without weights vs with return_weights=True")
