"""Masks: hidden keys are irrelevant (even NaN or inf), empty rows give the output bias, and masks that
say the same thing give the same result."""

from __future__ import annotations

import numpy as np

from .. import oracle
from ..oracle import head_projections
from ..strategies import LARGE_NEGATIVES, padding_bias
from ._common import (call, close, edit_weights, empty_rows, finite_rows, full_mask, identical, magnitude,
                      prefix_rows, prop, replace, rng_of, t1, t2)

_HIDING = ("mask", "additive_mask", "key_mask")


def _hide(impl, p, b: int, j: int):
    """A copy of ``p`` in which key j of batch element b is hidden from every query."""
    if "key_mask" in impl.features:
        km = np.ones((p.config.B, p.config.S), bool) if p.key_mask is None else p.key_mask.copy()
        km[b, j] = False
        return replace(p, key_mask=km)
    m = full_mask(p)
    if m is None:
        m = np.ones((p.config.B, p.config.H, p.config.T, p.config.S), bool)
        if "mask" not in impl.features:
            m = np.zeros(m.shape, np.float32)
    if m.dtype.kind == "f":
        m[b, :, :, j] = -np.inf
    else:
        m[b, :, :, j] = 0
    return replace(p, mask=m)


def _hidden_keys(p) -> np.ndarray:
    """(B, S) bool: keys no query of the batch element can see (nor reach, under the declared empty-row
    convention: under "mean_value" a query that sees no key reaches them all)."""
    return ~p.reaches().any(axis=(1, 2))


def _unchanged(p, actual, expected, what):
    """Bitwise equal under the nonfinite convention "isolated"; within T2 under "propagates", whose
    promise to other batch elements is no more than to compute them (a batched product may round them
    differently when some rows hold NaN)."""
    if p.convention("nonfinite") == "isolated":
        identical(actual, expected, what)
    else:
        close(actual, expected, t2(magnitude(p, expected)), what)


def _isolated_rows(p, dirty) -> np.ndarray:
    """(B, T) bool: rows the nonfinite convention promises to keep clean when the (B, S) positions
    ``dirty`` hold NaN/inf: "isolated", rows that reach none of them; "propagates", rows of batch
    elements without any."""
    if p.convention("nonfinite") == "propagates":
        return np.broadcast_to(~dirty.any(-1)[:, None], (p.config.B, p.config.T)).copy()
    return ~(p.reaches() & dirty[:, None, None, :]).any(axis=(1, 3))


def _perturbed(p, hidden, values):
    """Inputs with every hidden key/value position replaced by ``values`` (a scalar or noise)."""
    k, v = p.kv
    k, v = k.copy(), v.copy()
    k[hidden] = values if np.isscalar(values) else values[: k[hidden].size].reshape(k[hidden].shape)
    v[hidden] = values if np.isscalar(values) else values[: v[hidden].size].reshape(v[hidden].shape)
    return k, v


def _compare_rows(p, hidden):
    """Rows whose output must be unchanged: all of them for cross-attention; for self-attention a
    perturbed token is also a query, so its own row is excluded."""
    rows = np.ones((p.config.B, p.config.T), bool)
    if p.config.self_attention:
        rows &= ~hidden
    return rows


@prop("masked_keys_irrelevant", theme="masks", requires_any=_HIDING, positional=True)
def masked_keys_irrelevant(impl, p):
    """Hidden keys are irrelevant: replacing the key and value inputs at positions no query may see by
    N(0, 30^2) noise leaves every output bitwise unchanged (for self-attention, every row but those
    tokens' own)."""
    rng = rng_of(p, 3)
    p = _hide(impl, p, int(rng.integers(p.config.B)), int(rng.integers(p.config.S)))
    hidden = _hidden_keys(p)
    y, _ = call(impl, p)
    noise = 30.0 * rng.normal(size=p.config.S * p.config.B * max(p.config.kdim, p.config.vdim, p.config.E))
    k2, v2 = _perturbed(p, hidden, noise.astype(np.float32))
    q2 = k2 if p.config.self_attention else p.query
    y2, _ = call(impl, p, query=q2, key=k2, value=v2 if not p.config.self_attention else k2)
    rows = _compare_rows(p, hidden)
    identical(y2[rows], y[rows], "output after changing hidden keys/values")


def _additive(p) -> np.ndarray:
    """The problem's mask as a (B, H, T, S) float32 additive mask (bool False -> -inf; none -> zeros)."""
    m = full_mask(p)
    if m is None:
        return np.zeros((p.config.B, p.config.H, p.config.T, p.config.S), np.float32)
    if m.dtype.kind != "f":
        return np.where(m != 0, 0.0, -np.inf).astype(np.float32)
    return m.astype(np.float32)


@prop("large_negative_bias", requires=("additive_mask",), theme="masks", positional=True)
def large_negative_bias(impl, p):
    """A large finite negative in an additive mask (finfo(float32).min, as Hugging Face fills padding;
    -1e9; float16's lowest; -1e4) weighs a key down but hides nothing, and never ties with a hidden key.
    With whole query rows of it (a query whose every visible key carries it) and a key hidden from every
    query, changing the hidden inputs leaves every other row bitwise unchanged and finite; with
    causal=True, changing the inputs from position t on leaves the rows before t bitwise unchanged.
    And with a padding mask as Hugging Face builds one ((B, 1, 1, S), 0 at real keys, the fill on a run
    of keys at the start or the end of each batch element), the output equals the float64 oracle's
    within T1, per row (tolerance.mask_term): a blockwise kernel meets whole blocks of the fill first."""
    rng = rng_of(p, 20)
    c = np.float32(rng.choice([x for x in LARGE_NEGATIVES if np.isfinite(x)]))
    B, T = p.config.B, p.config.T
    m = _additive(p)
    rows = rng.random((B, T)) < 0.5
    rows[rng.integers(B), rng.integers(T)] = True
    m = np.where(rows[:, None, :, None] & np.isfinite(m), c, m)
    m = np.where(rng.random(m.shape) < 0.2, c, m).astype(np.float32)
    p = _hide(impl, replace(p, mask=m), int(rng.integers(B)), int(rng.integers(p.config.S)))
    hidden = _hidden_keys(p)
    y, _ = call(impl, p)
    if not np.isfinite(y[finite_rows(p)]).all():
        raise AssertionError(f"non-finite output with an additive mask of {c}")
    noise = 30.0 * rng.normal(size=p.config.S * B * max(p.config.kdim, p.config.vdim, p.config.E))
    k2, v2 = _perturbed(p, hidden, noise.astype(np.float32))
    q2 = k2 if p.config.self_attention else p.query
    y2, _ = call(impl, p, query=q2, key=k2, value=v2 if not p.config.self_attention else k2)
    keep = _compare_rows(p, hidden)
    identical(y2[keep], y[keep], f"output after changing hidden keys/values, additive mask of {c}")
    if p.causal and p.config.self_attention and T >= 2:
        t = int(rng.integers(1, T))
        x2 = p.query.copy()
        x2[:, t:] = (3.0 * rng.normal(size=x2[:, t:].shape)).astype(x2.dtype)
        y3, _ = call(impl, p, query=x2, key=x2, value=x2)
        before = prefix_rows(p, t)
        identical(y3[before], y[before], f"outputs before position {t} after changing inputs from {t} on, "
                                         f"additive mask of {c}")
    _padding_vs_oracle(impl, p, c, rng)


def _padding_vs_oracle(impl, p, c, rng) -> None:
    """The output under a Hugging Face padding mask of ``c`` (left padding mostly, as for generation)
    against the float64 oracle, within each row's bound."""
    p = replace(p, mask=padding_bias(rng, p.config.B, p.config.S, c))
    y, _ = call(impl, p)
    k, v = p.kv
    y_ref, P_ref = oracle.attention(p.weights, p.query, k, v, **p.masks(), **p.oracle_options())
    close(y, y_ref, t1(magnitude(p, y_ref, P_ref=P_ref)), f"output vs float64 oracle, padding mask of {c}")


@prop("nonfinite_hidden_isolation", theme="masks", requires_any=_HIDING, self_attention=False,
      requires=("cross",))
def nonfinite_hidden_isolation(impl, p):
    """NaN and inf at hidden key/value positions never reach the output: with NaN, +inf or -inf written
    into every hidden key and value vector, the output is finite and bitwise equal to the clean one
    (rows of queries that see no key as the empty-row convention says). Under the nonfinite convention
    "propagates", only in batch elements with no such input."""
    rng = rng_of(p, 4)
    b = int(rng.integers(p.config.B))
    p = _hide(impl, p, b, int(rng.integers(p.config.S)))
    hidden = _hidden_keys(p)
    if p.convention("nonfinite") == "propagates":  # dirty one batch element, watch the others
        hidden[np.arange(p.config.B) != b] = False
    rows = _isolated_rows(p, hidden) & finite_rows(p)
    y, _ = call(impl, p)
    for bad in (np.nan, np.inf, -np.inf):
        k2, v2 = _perturbed(p, hidden, bad)
        y2, _ = call(impl, p, key=k2, value=v2)
        _unchanged(p, y2[rows], y[rows], f"output with {bad} at hidden keys/values")
        if not np.isfinite(y2[rows]).all():
            raise AssertionError(f"non-finite output with {bad} at hidden positions")


@prop("empty_rows_output_bias", theme="masks", requires_any=_HIDING, positional=True,
      excluded=[("empty_row", "unspecified", "nothing is promised for a query that sees no key")])
def empty_rows_output_bias(impl, p):
    """A query that may see no key has zero context: its output is exactly the output bias b_O (0 without
    bias), never NaN, and (with "weights") its weights are all exactly 0. Under the empty-row convention
    "nan" its output row and weights are all NaN instead; under "mean_value" its weights are 1/S on
    every key (within 2 S u) and its output is the mean of all values through W_O (T1)."""
    rng = rng_of(p, 5)
    b, i = int(rng.integers(p.config.B)), int(rng.integers(p.config.T))
    if "mask" in impl.features or "additive_mask" in impl.features:
        m = full_mask(p)
        if m is None:
            m = np.ones((p.config.B, p.config.H, p.config.T, p.config.S), bool)
            if "mask" not in impl.features:
                m = np.zeros(m.shape, np.float32)
        m[b, :, i, :] = -np.inf if m.dtype.kind == "f" else 0
        p = replace(p, mask=m)
    else:
        km = np.ones((p.config.B, p.config.S), bool) if p.key_mask is None else p.key_mask.copy()
        km[b] = False
        p = replace(p, key_mask=km)
    rw = "weights" in impl.features
    y, P = call(impl, p, return_weights=rw)
    empty_h = empty_rows(p)  # (B, H, T)
    empty = empty_h.all(1)  # (B, T): rows empty in every head
    conv = p.convention("empty_row")
    if conv == "nan":
        if not np.isnan(y[empty]).all():
            raise AssertionError("an output row of a query that sees no key is not all NaN (declared 'nan')")
        if rw and not np.isnan(P[empty_h]).all():
            raise AssertionError("weights of a query that sees no key are not all NaN (declared 'nan')")
        return
    if not np.isfinite(y[finite_rows(p)]).all():
        raise AssertionError("NaN or inf in the output with an empty row")
    if conv == "mean_value":
        k, v = p.kv
        _, _, vs = head_projections(p.weights, p.query, k, v)
        G = p.config.H // p.config.Hkv
        ctx = np.concatenate([np.broadcast_to(vs[h // G].mean(1, keepdims=True), vs[h // G].shape[:1] + (p.config.T,)
                                              + vs[h // G].shape[2:]) for h in range(p.config.H)], axis=-1)
        expected = ctx @ p.weights.o_weight.astype(np.float64).T + (0.0 if p.weights.o_bias is None
                                                                    else p.weights.o_bias)
        close(y[empty], expected[empty], t1(magnitude(p, y)), "outputs of queries that see no key vs mean of values")
        if rw:
            close(P[empty_h], np.full(P[empty_h].shape, 1.0 / p.config.S), 2 * p.config.S * 2.0**-24,
                  "weights of queries that see no key vs 1/S")
        return
    bias = np.zeros(p.config.E) if p.weights.o_bias is None else p.weights.o_bias.astype(np.float64)
    identical(y[empty], np.broadcast_to(bias, y[empty].shape), "outputs of queries that see no key")
    if rw:
        identical(P[empty_h], np.zeros_like(P[empty_h]), "weights of queries that see no key")


@prop("mask_algebra", theme="masks", requires_any=("mask", "key_mask", "additive_mask"))
def mask_algebra(impl, p):
    """Masks that say the same thing give the same result (T2): an all-True mask = no mask; key_mask
    km = mask km[:, None, None, :]; an additive {0, -inf} mask = the bool mask, and so is {0, -1e4} on rows
    that keep a key; mask AND causal = the combined bool mask; mask AND key_mask = their AND."""
    f = impl.features
    base = {"mask": None, "key_mask": None}
    y0, _ = call(impl, p, masks=base)
    M = magnitude(p, y0)
    B, H, T, S = p.config.B, p.config.H, p.config.T, p.config.S
    if "mask" in f:
        y, _ = call(impl, p, masks={"mask": np.ones((T, S), bool)})
        close(y, y0, t2(M), "all-True mask vs no mask")
    km = p.key_mask if p.key_mask is not None else rng_of(p, 6).random((B, S)) < 0.7
    keep = full_mask(p) if p.mask is not None and p.mask.dtype.kind != "f" else rng_of(p, 7).random((B, H, T, S)) < 0.7
    keep = keep != 0
    if "key_mask" in f:
        ya, _ = call(impl, p, masks={"key_mask": km})
        if "mask" in f:
            yb, _ = call(impl, p, masks={"mask": km[:, None, None, :]})
            close(ya, yb, t2(M), "key_mask vs the same mask")
            yc, _ = call(impl, p, masks={"mask": keep, "key_mask": km})
            yd, _ = call(impl, p, masks={"mask": keep & km[:, None, None, :]})
            close(yc, yd, t2(M), "mask and key_mask vs their AND")
    if "mask" in f and "additive_mask" in f:
        ya, _ = call(impl, p, masks={"mask": keep})
        yb, _ = call(impl, p, masks={"mask": np.where(keep, 0.0, -np.inf).astype(np.float32)})
        close(ya, yb, t2(M), "bool mask vs additive {0, -inf}")
        # A finite -1e4 hides as well as -inf (e^-1e4 = 0) wherever a row keeps a visible key.
        keep1 = keep.copy()
        keep1[..., 0] = True
        ya, _ = call(impl, p, masks={"mask": keep1})
        yb, _ = call(impl, p, masks={"mask": np.where(keep1, 0.0, -1e4).astype(np.float32)})
        close(ya, yb, t2(magnitude(p, y0, mask=np.full((1,), 1e4))), "bool mask vs additive {0, -1e4}")
    if "mask" in f and "causal" in f:
        ya, _ = call(impl, p, masks={"mask": keep, "causal": True})
        tri = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T if p.convention("causal") == "bottom_right" else 0)
        yb, _ = call(impl, p, masks={"mask": keep & tri})
        close(ya, yb, t2(M), "mask with causal=True vs the combined bool mask")


@prop("nonfinite_visible_confined", theme="masks", requires=("cross",), self_attention=False)
def nonfinite_visible_confined(impl, p):
    """NaN or inf at a key/value vector that some queries may see spreads to exactly those queries'
    outputs (all of their features, through W_O) and no further: every other row stays bitwise equal.
    Under the nonfinite convention "propagates", only rows of the other batch elements are checked."""
    rng = rng_of(p, 18)
    b, j = int(rng.integers(p.config.B)), int(rng.integers(p.config.S))
    y, _ = call(impl, p)
    # (T,): queries of batch b that see key j in some head; under "mean_value" a query that sees no key
    # averages every value (its output depends on value j, not on key j)
    sees = {"key": p.visible()[b, :, :, j].any(0), "value": p.reaches()[b, :, :, j].any(0)}
    if p.convention("nonfinite") == "propagates":
        sees = {n: np.ones_like(a) for n, a in sees.items()}  # no promise inside batch element b
    # NaN in a key; inf in a value; -inf in a key, which can make a logit -inf (exp 0: a kernel left alone
    # just drops that key, and the row stays finite)
    for where, bad in (("key", np.nan), ("value", np.inf), ("key", -np.inf)):
        k, v = p.kv
        k2, v2 = k.copy(), v.copy()
        (k2 if where == "key" else v2)[b, j, 0] = bad
        y2, _ = call(impl, p, key=k2, value=v2)
        rows = np.zeros(y.shape[:2], bool)
        rows[b] = sees[where]
        _unchanged(p, y2[~rows], y[~rows], f"rows that cannot see the {bad} at key {j}")
        if p.convention("nonfinite") == "isolated" and np.isfinite(y2[rows]).any():
            raise AssertionError(f"a row that sees the {bad} at key {j} stayed (partly) finite")
    if p.rope is None:  # RoPE mixes a key's coordinates: inf - inf
        _minus_inf_logits(impl, p, b, j, sees["key"])


def _minus_inf_logits(impl, p, b: int, j: int, sees):
    """The sharpest case of -inf in a key: every logit of key j exactly -inf, so that a softmax gives it
    weight exp(-inf) = 0 and a kernel left alone returns finite rows. Made so: W_q, b_q and the queries
    positive (q > 0: |x| + 0.5 and |b_q| + 0.5), W_k's first column positive and key j's first feature
    -inf (each coordinate of its projection -inf): every product q_d k_d is -inf, never inf - inf."""
    w = p.weights
    wq, bq, wk = np.abs(w.q_weight), w.q_bias, w.k_weight.copy()
    wk[:, 0] = np.abs(wk[:, 0]) + 0.5
    weights = edit_weights(w, q_weight=wq, k_weight=wk, q_bias=None if bq is None else np.abs(bq) + 0.5)
    query = np.abs(p.query) + p.query.dtype.type(0.5)
    y, _ = call(impl, p, weights=weights, query=query)
    k, v = p.kv
    k2 = k.copy()
    k2[b, j, 0] = -np.inf
    y2, _ = call(impl, p, weights=weights, query=query, key=k2, value=v)
    rows = np.zeros(y.shape[:2], bool)
    rows[b] = sees
    _unchanged(p, y2[~rows], y[~rows], f"rows that cannot see key {j}, whose logits are all -inf")
    if p.convention("nonfinite") == "isolated" and np.isfinite(y2[rows]).any():
        raise AssertionError(f"a row that sees key {j}, which holds -inf and whose logits are all -inf, "
                             f"stayed (partly) finite")


@prop("nonfinite_self_attention", theme="masks", self_attention=True, positional=True)
def nonfinite_self_attention(impl, p):
    """Self-attention with NaN, +inf or -inf in one feature of one token: that token's key and value are
    not finite, so every row that may see it becomes NaN (all features, through W_O), and every row that
    cannot (the token's own row aside) stays bitwise equal to the clean output and finite (unless the
    empty-row convention makes it NaN). Under the nonfinite convention "propagates", only rows of the
    other batch elements are checked."""
    rng = rng_of(p, 19)
    b, j = int(rng.integers(p.config.B)), int(rng.integers(p.config.T))
    feature = int(rng.integers(p.config.E))
    y, _ = call(impl, p)
    sees = p.reaches()[b, :, :, j].any(0)  # (T,): queries of batch b that see token j in some head
    if p.convention("nonfinite") == "propagates":
        sees = np.ones_like(sees)  # no promise inside batch element b
    others = np.ones(y.shape[:2], bool)
    others[b] = ~sees
    others[b, j] = False  # its own query is not finite either
    seeing = np.zeros(y.shape[:2], bool)
    seeing[b] = sees
    seeing[b, j] = False
    for bad in (np.nan, np.inf, -np.inf):
        x = p.query.copy()
        x[b, j, feature] = bad
        y2, _ = call(impl, p, query=x, key=x, value=x)
        _unchanged(p, y2[others], y[others], f"rows that cannot see token {j} with {bad} in its input")
        if not np.isfinite(y2[others & finite_rows(p)]).all():
            raise AssertionError(f"a row that cannot see token {j} ({bad} in its input) is not finite")
        if p.convention("nonfinite") == "isolated" and np.isfinite(y2[seeing]).any():
            raise AssertionError(f"a row that sees token {j} ({bad} in its input) stayed (partly) finite")
