"""Shared machinery of the property modules: the registry, calling an implementation, bounds."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ... import AttentionWeights
from .. import tolerance
from ..strategies import Problem, problems

PROPERTIES: dict = {}


@dataclass(frozen=True)
class Property:
    """One property: what an implementation must satisfy, for which features, on which problems."""

    name: str
    requires: frozenset  # features the implementation must declare, all of them
    requires_any: frozenset  # ... and at least one of these (if any are listed)
    strategy: Callable  # features -> hypothesis strategy of examples
    check: Callable  # (impl, example) -> None, raises AssertionError
    theme: str
    excluded: tuple = ()  # ((convention, value, reason), ...): n/a under these declared conventions
    dtypes: tuple = ()  # precisions the implementation must list in its ``dtypes`` (float32 is always there)

    def missing(self, features) -> str | None:
        """Why an implementation with ``features`` cannot express this property (None if it can)."""
        lacking = sorted(self.requires - set(features))
        if lacking:
            return "needs " + ", ".join(lacking)
        if self.requires_any and not self.requires_any & set(features):
            return "needs one of " + ", ".join(sorted(self.requires_any))
        return None

    def not_applicable(self, features, conventions: dict, dtypes=("float32",)) -> str | None:
        """Why an implementation with ``features``, declared ``conventions`` and ``dtypes`` cannot be held
        to this property (None if it can)."""
        reason = self.missing(features)
        if reason:
            return reason
        lacking = [d for d in self.dtypes if d not in dtypes]
        if lacking:
            return "needs dtypes " + ", ".join(lacking)
        for key, value, why in self.excluded:
            if conventions.get(key) == value:
                return f"{key}={value}: {why}"
        return None

    @property
    def doc(self) -> str:
        return (self.check.__doc__ or "").strip()

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else self.name


def prop(name: str, *, requires=(), theme: str, **strategy_kwargs):
    """Register ``fn(impl, problem)`` as a property drawn from ``problems(features, **strategy_kwargs)``.

    ``requires`` lists the features the implementation must declare; ``requires_any`` (in
    ``strategy_kwargs``) lists features of which at least one is needed.
    """
    any_of = frozenset(strategy_kwargs.pop("requires_any", ()))
    excluded = tuple(strategy_kwargs.pop("excluded", ()))
    dtypes = tuple(strategy_kwargs.pop("dtypes", ()))
    maker = strategy_kwargs.pop("problems", problems)  # the strategy of problems (strategies.problems)

    def strategy(features):
        return maker(features, **strategy_kwargs)

    def deco(fn):
        PROPERTIES[name] = Property(name, frozenset(requires), any_of, strategy, fn, theme, excluded, dtypes)
        return fn

    return deco


def call(impl, problem: Problem, *, weights: AttentionWeights | None = None, query=None, key=None, value=None,
         masks: dict | None = None, return_weights=False, scale=None, head_mask=None, same_call=False):
    """Run ``impl`` on ``problem`` (with optional overrides); returns (output, weights or None) as
    float64 numpy arrays. Only arguments of declared features are passed.

    With ``return_weights`` the implementation runs twice: the output returned is the one of the plain
    call (so every property exercises the fast path too) and the weights those of the call that asked
    for them; ``same_call=True`` returns that call's output instead. That the two outputs agree is a
    property of its own (weights_flag_invariance)."""
    weights = problem.weights if weights is None else weights
    fn = build(impl, problem, weights, scale=scale)
    q = problem.query if query is None else query
    k_default, v_default = problem.kv
    k = k_default if key is None else key
    v = v_default if value is None else value
    kwargs = dict(problem.masks() if masks is None else masks)
    kwargs = {n: a for n, a in kwargs.items() if a is not None and not (n == "causal" and not a)}
    if head_mask is not None:
        kwargs["head_mask"] = head_mask
    if not return_weights or not same_call:
        y = np.asarray(fn(q, k, v, **kwargs), np.float64)
        if not return_weights:
            return _unspecified(problem, y, None, q, k, kwargs)
    y_w, P = (np.asarray(a, np.float64) for a in fn(q, k, v, return_weights=True, **kwargs))
    return _unspecified(problem, y_w if same_call else y, P, q, k, kwargs)


def _unspecified(problem: Problem, y, P, q, k, masks):
    """Under the empty_row convention "unspecified", rows of queries that see no key in some head hold
    any value: they become NaN (the oracle's value for them), so comparisons skip them alike."""
    if problem.convention("empty_row") != "unspecified" or np.ndim(y) != 3:
        return y, P
    from ..oracle import visible_keys

    (B, T), S, H = np.shape(q)[:2], np.shape(k)[1], problem.weights.num_heads
    vis = visible_keys(B, H, T, S, mask=masks.get("mask"), key_mask=masks.get("key_mask"),
                       causal=bool(masks.get("causal")), window=problem.window,
                       causal_align=problem.convention("causal"))
    empty = ~vis.any(-1)  # (B, H, T)
    y = np.where(empty.any(1)[..., None], np.nan, y)
    if P is not None:
        P = np.where(empty[..., None], np.nan, P)
    return y, P


def empty_row_weights(p: Problem, P: np.ndarray) -> np.ndarray:
    """Weights (B, H, T, S) computed with all-zero rows for queries that see no key, turned into the
    declared empty-row convention's: zeros, NaN, or 1/S over every key."""
    conv = p.convention("empty_row")
    if conv == "output_bias":
        return P
    empty = ~p.visible().any(-1, keepdims=True)
    fill = np.float64(1.0 / P.shape[-1]) if conv == "mean_value" else np.nan
    return np.where(empty, fill, P)


def prefix_rows(p: Problem, t: int) -> np.ndarray:
    """(B, T) bool: rows before position t whose output may depend on keys before t only (all of them
    under the causal rule, but a query that sees no key under "mean_value" reaches every key)."""
    rows = ~p.reaches()[..., t:].any(axis=(1, 3))
    rows[:, t:] = False
    return rows


def finite_rows(p: Problem) -> np.ndarray:
    """(B, T) bool: output rows the declared empty-row convention keeps finite (all but rows with an
    empty head under "nan" and "unspecified")."""
    if p.convention("empty_row") in ("nan", "unspecified"):
        return ~empty_rows(p).any(1)
    return np.ones((p.config.B, p.config.T), bool)


def build(impl, problem: Problem, weights=None, *, scale=None, **options):
    """``impl.build`` with the problem's layer options (rope, window), ``scale`` and ``options``."""
    kwargs = {**problem.layer_options(), **options}
    if scale is not None:
        kwargs["scale"] = scale
    return impl.build(problem.weights if weights is None else weights, **kwargs)


def magnitude(problem: Problem, y_ref=None, *, weights=None, query=None, key=None, value=None, mask=None,
              **kw) -> float:
    k, v = problem.kv
    kw.setdefault("max_angle", problem.max_angle())
    return tolerance.magnitude(problem.weights if weights is None else weights,
                               problem.query if query is None else query,
                               k if key is None else key, v if value is None else value,
                               y_ref=y_ref, mask=problem.mask if mask is None else mask, **kw)


def weights_tol(problem: Problem, *, weights=None, query=None, key=None, evaluations: int = 2, P_ref=None):
    """Bound for attention weights (tolerance.weights_magnitude), for ``evaluations`` evaluations; per
    query row, (B, H, T, 1), given the exact weights ``P_ref``."""
    k, _ = problem.kv
    MP = tolerance.weights_magnitude(problem.weights if weights is None else weights,
                                     problem.query if query is None else query, k if key is None else key,
                                     mask=problem.mask, max_angle=problem.max_angle(), P_ref=P_ref)
    return evaluations * tolerance.t1("float32", MP)


def t1(M: float) -> float:
    return tolerance.t1("float32", M)


def t2(M: float) -> float:
    return tolerance.t2("float32", "float32", M)


def close(actual, expected, tol, what):
    tolerance.assert_close(actual, expected, tol, what)


def identical(actual, expected, what):
    """Bitwise equality (NaN equal to NaN)."""
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape or not np.array_equal(a, e, equal_nan=True):
        if a.shape != e.shape:
            raise AssertionError(f"{what}: shape {a.shape} != {e.shape}")
        d = np.where(np.isnan(a) & np.isnan(e), 0.0, np.abs(a - e))
        idx = np.unravel_index(np.nanargmax(np.where(np.isnan(d), np.inf, d)), d.shape)
        raise AssertionError(f"{what}: not bitwise identical; first worst difference at "
                             f"{tuple(int(i) for i in idx)}: {a[idx]!r} vs {e[idx]!r}")


def rng_of(problem: Problem, salt: int) -> np.random.Generator:
    return np.random.default_rng([problem.seed, salt])


def full_mask(problem: Problem) -> np.ndarray | None:
    """The problem's mask broadcast to (B, H, T, S) (a copy), or None."""
    if problem.mask is None:
        return None
    c = problem.config
    m = problem.mask.reshape((1,) * (4 - problem.mask.ndim) + problem.mask.shape)
    return np.array(np.broadcast_to(m, (c.B, c.H, c.T, c.S)))


def edit_weights(weights: AttentionWeights, **arrays) -> AttentionWeights:
    d = weights.to_dict()
    d.update(arrays)
    return AttentionWeights(**d, num_heads=weights.num_heads, num_kv_heads=weights.num_kv_heads)


def empty_rows(problem: Problem) -> np.ndarray:
    """(B, H, T) bool: queries that see no key."""
    return ~problem.visible().any(-1)


__all__ = ["PROPERTIES", "Property", "prop", "build", "call", "magnitude", "t1", "t2", "weights_tol", "close",
           "identical", "rng_of", "full_mask", "edit_weights", "empty_rows", "empty_row_weights", "finite_rows", "prefix_rows",
           "replace"]
