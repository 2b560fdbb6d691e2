"""Which conventions an implementation follows: :func:`detect`.

Each convention is probed on small seeded problems, smallest first, through every route the adapter
declares (a bool mask, an additive mask, key_mask, the causal flag; with and without weights; one and
two batch elements), so that a path that answers differently shows up as "inconsistent". Probes
compare the implementation with itself where they can (a causal call against the same call with
either triangle as a mask), so a bug elsewhere (a wrong scale) does not pass for a convention.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import oracle, tolerance
from ._answers import ImplementationError
from ._guard import DEFAULT_TIMEOUT, NoAnswer, guard
from .conventions import DEFAULTS, ERROR, INCONSISTENT

NA = "n/a"


class Detection(dict):
    """The detected conventions (same keys as mha.testing.conventions.DEFAULTS; a value may also be
    "inconsistent", or "n/a" when the adapter's features cannot show it). ``examples`` maps each
    non-default value's key to a minimal example that shows it."""

    def __init__(self, impl_name: str, values: dict, examples: dict):
        super().__init__(values)
        self.impl = impl_name
        self.examples = examples

    def as_dict(self) -> dict:
        return {"impl": self.impl, "conventions": dict(self), "examples": dict(self.examples)}


def _config(B, T, S, H, D, Hkv=None):
    from .strategies import Config

    return Config(B, T, S, H, Hkv or H, D, H * D, H * D, True, False)


# Probe sizes, smallest first (B, T, S, H, D): the first probe that shows a behaviour is its example.
_SIZES = [(1, 1, 3, 1, 2), (2, 2, 3, 2, 2), (1, 3, 5, 2, 3), (2, 3, 4, 3, 2), (2, 2, 5, 2, 3), (3, 4, 6, 2, 2),
          (2, 5, 7, 3, 3), (1, 4, 7, 4, 2)]


def _probes(n: int):
    """(config, weights, q, k, v, seed) for n probes."""
    from .strategies import random_inputs, random_weights

    for i in range(n):
        B, T, S, H, D = _SIZES[i % len(_SIZES)]
        cfg = _config(B, T, S, H, D)
        rng = np.random.default_rng([2026, i])
        w = random_weights(cfg, rng)
        q, k, v = random_inputs(cfg, rng)
        yield cfg, w, q, k, v, i


def _describe(cfg, seed, route="", extra=""):
    parts = [f"B={cfg.B}, T={cfg.T}, S={cfg.S}, H={cfg.H}, D={cfg.D}, seed={seed}"]
    return f"Probe({', '.join(parts + [p for p in (route, extra) if p])})"


def _run(fn, q, k, v, weights=False, **kw):
    with np.errstate(all="ignore"):
        res = fn(q, k, v, return_weights=True, **kw) if weights else fn(q, k, v, **kw)
    if weights:
        return np.asarray(res[0], np.float64), np.asarray(res[1], np.float64)
    return np.asarray(res, np.float64), None


def _tri(T, S, align):
    offset = S - T if align == "bottom_right" else 0
    return np.arange(S)[None, :] <= np.arange(T)[:, None] + offset  # (T, S)


def detect_causal(impl, n: int):
    """"bottom_right", "top_left", "inconsistent" or "n/a", and the example."""
    f = impl.features
    if "causal" not in f or "cross" not in f:
        return NA, "needs the causal and cross features (with T = S the alignments agree)"
    verdicts = []
    for cfg, w, q, k, v, seed in _probes(n):
        fn = impl.build(w)
        y, _ = _run(fn, q, k, v, causal=True)
        M = tolerance.magnitude(w, q, k, v, y_ref=np.where(np.isfinite(y), y, 0))
        matches = []
        for align in ("bottom_right", "top_left"):
            tri = _tri(cfg.T, cfg.S, align)
            if "mask" in f:
                ref, _ = _run(fn, q, k, v, mask=tri)
                tol = tolerance.t2("float32", "float32", M)
            else:
                ref, _ = oracle.attention(w, q, k, v, causal=True, causal_align=align)
                tol = tolerance.t1("float32", M)
            if np.isfinite(y).all() and np.abs(y - ref).max() <= tol:
                matches.append(align)
        verdict = matches[0] if len(matches) == 1 else INCONSISTENT
        verdicts.append((verdict, _describe(cfg, seed, "causal=True")))
    return _settle(verdicts, "causal")


def _settle(verdicts, key):
    """One value for all probes, or "inconsistent"; with the example of the first non-default one."""
    values = {v for v, _ in verdicts}
    if len(values) == 1:
        value = values.pop()
        example = next((e for v, e in verdicts if v != DEFAULTS.get(key)), "")
        return value, (example if value != DEFAULTS.get(key) else "")
    seen = {}
    for v, e in verdicts:
        seen.setdefault(v, e)
    return INCONSISTENT, "; ".join(f"{v}: {e}" for v, e in seen.items())


def _routes(impl, cfg):
    """(name, masks, empty (B, H, T) bool) ways to give query 0 of batch element 0 no key."""
    f, B, H, T, S = impl.features, cfg.B, cfg.H, cfg.T, cfg.S
    out = []
    row = np.zeros((B, H, T), bool)
    row[0, :, 0] = True
    if "mask" in f:
        m = np.ones((B, 1, T, S), bool)
        m[0, :, 0] = False
        out.append(("bool mask", {"mask": m}, row))
    if "additive_mask" in f:
        a = np.zeros((B, 1, T, S), np.float32)
        a[0, :, 0] = -np.inf
        out.append(("additive -inf mask", {"mask": a}, row))
    if "key_mask" in f:
        km = np.ones((B, S), bool)
        km[0] = False
        whole = np.zeros((B, H, T), bool)
        whole[0] = True
        out.append(("key_mask", {"key_mask": km}, whole))
    return out


def _classify(y, P, empty, w, q, k, v, cfg):
    """What the rows of queries that see no key hold: "nan", "output_bias", "mean_value" or "other"."""
    rows = empty.all(1)  # (B, T)
    got = y[rows]
    bias = np.asarray(w.o_bias, np.float64)
    mean, _ = oracle.attention(w, q, k, v, mask=np.zeros((cfg.T, cfg.S), bool), empty_row="mean_value")
    tol = tolerance.t1("float32", tolerance.magnitude(w, q, k, v, y_ref=mean))
    if np.isnan(got).all():
        kind = "nan"
    elif np.isfinite(got).all() and np.abs(got - bias).max() <= tol:
        kind = "output_bias"
    elif np.isfinite(got).all() and np.abs(got - mean[rows]).max() <= tol:
        kind = "mean_value"
    else:
        kind = "other"
    if P is not None:
        Pe = P[empty]
        pkind = ("nan" if np.isnan(Pe).all() else "output_bias" if (Pe == 0).all()
                 else "mean_value" if np.abs(Pe - 1.0 / cfg.S).max() <= 2 * cfg.S * 2.0**-24 else "other")
        if pkind != kind:
            kind = f"{kind} (weights: {pkind})"
    return kind, got[0, :3]


def detect_empty_row(impl, n: int):
    f = impl.features
    if not f & {"mask", "additive_mask", "key_mask"}:
        return NA, "needs a way to hide keys (mask, additive_mask or key_mask)"
    verdicts = []
    for cfg, w, q, k, v, seed in _probes(n):
        fn = impl.build(w)
        # cross-attention, and self-attention (query is key is value: some layers take a fused path)
        inputs = ([("", cfg, q, k, v)] if "cross" in f else []) + [(", self-attention", replace(cfg, T=cfg.S), k, k, k)]
        for kind_of, c, qq, kk, vv in inputs:
            for route, masks, empty in _routes(impl, c):
                for weights in ((False, True) if "weights" in f else (False,)):
                    y, P = _run(fn, qq, kk, vv, weights=weights, **masks)
                    kind, got = _classify(y, P, empty, w, qq, kk, vv, c)
                    path = route + kind_of + (", return_weights=True" if weights else "")
                    verdicts.append((kind, _describe(c, seed, path, f"empty row 0 -> {np.round(got, 4).tolist()}...")))
    value, example = _settle(verdicts, "empty_row")
    if value not in (INCONSISTENT, "nan", "output_bias", "mean_value"):
        return INCONSISTENT, f"{value}: {example}"
    return value, example


def detect_nonfinite(impl, n: int):
    f = impl.features
    if not f & {"mask", "additive_mask", "key_mask"}:
        return NA, "needs a way to hide keys"
    verdicts = []
    for cfg, w, q, k, v, seed in _probes(n):
        if cfg.S < 2:
            continue
        fn = impl.build(w)
        if "cross" not in f:
            verdicts.append(_nonfinite_self(impl, fn, cfg, w, k, seed))
            continue
        j = cfg.S - 1
        masks, route = _hide_key(impl, cfg, j)
        y, _ = _run(fn, q, k, v, **masks)
        M = tolerance.magnitude(w, q, k, v, y_ref=y)
        verdict = "isolated"
        for where, bad in (("value", np.nan), ("key", np.nan), ("value", np.inf)):
            k2, v2 = k.copy(), v.copy()
            (k2 if where == "key" else v2)[0, j] = bad
            y2, _ = _run(fn, q, k2, v2, **masks)
            example = _describe(cfg, seed, route, f"{bad} in {where} {j} of batch 0 (hidden)")
            if cfg.B > 1 and not (np.isfinite(y2[1:]).all() and np.abs(y2[1:] - y[1:]).max()
                                  <= tolerance.t2("float32", "float32", M)):
                verdict = INCONSISTENT
                break
            if not np.array_equal(y2, y):
                verdict = "propagates"
                break
        if verdict == "isolated":  # a visible NaN key must make the rows that see it NaN
            k2 = k.copy()
            k2[0, 0] = np.nan
            y2, _ = _run(fn, q, k2, v, **masks)
            example = _describe(cfg, seed, route, "nan in key 0 of batch 0 (visible)")
            if not np.isnan(y2[0]).all() or not np.array_equal(y2[1:], y[1:]):
                verdict = "propagates"
        verdicts.append((verdict, example))
    if not verdicts:
        return NA, "no probe with S >= 2"
    return _settle(verdicts, "nonfinite")


def _nonfinite_self(impl, fn, cfg, w, x, seed):
    """Self-attention probe: NaN/inf in hidden token j of batch element 0 (its own row aside)."""
    cfg = replace(cfg, T=cfg.S)
    j = cfg.S - 1
    masks, route = _hide_key(impl, cfg, j)
    y, _ = _run(fn, x, x, x, **masks)
    others = np.ones((cfg.B, cfg.T), bool)
    others[0, j] = False
    M = tolerance.magnitude(w, x, y_ref=y)
    for bad in (np.nan, np.inf):
        x2 = x.copy()
        x2[0, j] = bad
        y2, _ = _run(fn, x2, x2, x2, **masks)
        example = _describe(cfg, seed, route + ", self-attention", f"{bad} in token {j} of batch 0 (hidden)")
        if cfg.B > 1 and not (np.isfinite(y2[1:]).all() and np.abs(y2[1:] - y[1:]).max()
                              <= tolerance.t2("float32", "float32", M)):
            return INCONSISTENT, example
        if not np.array_equal(y2[others], y[others]):
            return "propagates", example
    return "isolated", ""


def detect_sink_weights(impl, n: int):
    """"dropped" (weights over the S real keys, rows summing to 1 - the sink's share), "column" (S + 1
    columns, the last the sink's share), "inconsistent" or "n/a", against the oracle with sink logits
    ~ N(0, 3^2) per head."""
    f = impl.features
    if "sinks" not in f or "weights" not in f:
        return NA, "needs the sinks and weights features"
    from .. import AttentionWeights

    verdicts = []
    for cfg, w, q, k, v, seed in _probes(n):
        d = w.to_dict()
        d["sinks"] = np.random.default_rng([2026, seed, 41]).normal(0.0, 3.0, cfg.H).astype(np.float32)
        w = AttentionWeights(**d, num_heads=w.num_heads, num_kv_heads=w.num_kv_heads)
        _, P = _run(impl.build(w), q, k, v, weights=True)
        _, ref = oracle.attention(w, q, k, v)
        tol = 2 * (cfg.S + 1) * 2.0**-24 + 4 * 2.0**-24 * tolerance.magnitude(w, q, k, v)
        share = 1.0 - ref.sum(-1)
        if P.shape[-1] == cfg.S and np.abs(P - ref).max() <= tol:
            verdict = "dropped"
        elif (P.shape[-1] == cfg.S + 1 and np.abs(P[..., :-1] - ref).max() <= tol
              and np.abs(P[..., -1] - share).max() <= tol):
            verdict = "column"
        else:
            verdict = INCONSISTENT
        shape = f"weights {P.shape[-1]} wide, S={cfg.S}"
        verdicts.append((verdict, _describe(cfg, seed, "return_weights=True", shape)))
    return _settle(verdicts, "sink_weights")


def _hide_key(impl, cfg, j):
    """Masks hiding key j of batch element 0 from every query (and nothing else)."""
    if "key_mask" in impl.features:
        km = np.ones((cfg.B, cfg.S), bool)
        km[0, j] = False
        return {"key_mask": km}, "key_mask"
    if "mask" in impl.features:
        m = np.ones((cfg.B, 1, 1, cfg.S), bool)
        m[0, ..., j] = False
        return {"mask": m}, "bool mask"
    a = np.zeros((cfg.B, 1, 1, cfg.S), np.float32)
    a[0, ..., j] = -np.inf
    return {"mask": a}, "additive -inf mask"


def detect(impl, max_examples: int | None = None, *, timeout: float | None = DEFAULT_TIMEOUT) -> Detection:
    """The conventions ``impl`` (an adapter, mha.testing.adapters) follows, probed on ``max_examples``
    small problems per convention (default 8): a :class:`Detection`, a dict with the keys of
    mha.testing.conventions (a value may also be "inconsistent": different answers on different
    paths or probes; "n/a"; or "error": a probe crashed, gave no answer within ``timeout`` seconds or
    answered outside the adapter protocol, which says nothing about a convention) and ``.examples``,
    a minimal example for each non-default value (for "error", what went wrong)."""
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    impl = guard(impl, timeout, finite="any")
    n = max_examples or len(_SIZES)
    values, examples = {}, {}
    for key, probe in (("causal", detect_causal), ("empty_row", detect_empty_row), ("nonfinite", detect_nonfinite),
                       ("sink_weights", detect_sink_weights)):
        try:
            value, example = probe(impl, n)
        except (Exception, NoAnswer) as err:  # a crash is no convention: say what happened
            value = ERROR
            example = str(err) if isinstance(err, (ImplementationError, NoAnswer)) else f"{type(err).__name__}: {err}"
        values[key] = value
        if example and value != DEFAULTS[key]:
            examples[key] = example
    return Detection(impl.name, values, examples)
