"""Numerics at the dtype's limits: inputs and scales as large as the dtype can hold.

A layer's answer must stay finite, inside the convex hull its values allow and equal to the float64
oracle for every input its dtype can hold, though the logits then pass the dtype's range (|x| ~ 1e37 in
float32 gives logits ~ 1e74); how it gets there (scaling, a wider accumulator) is its own business.
"""

from __future__ import annotations

import numpy as np

from .. import oracle, tolerance
from ..strategies import extreme_problems
from ._common import call, close, magnitude, prop, replace, rng_of

F32_MAX = float(np.finfo(np.float32).max)


def _hull(p, y, query, value, what: str) -> None:
    """|y - b_O| <= ||W_O||_inf max_j |v_j| (plus rounding) on every finite entry: attention weights are
    a convex combination, whatever the logits."""
    w = {n: None if a is None else np.abs(np.asarray(a, np.float64)) for n, a in p.weights.to_dict().items()}
    v = np.abs(np.asarray(value, np.float64)).reshape(-1, np.shape(value)[-1]) @ w["v_weight"].T
    vmax = float(v.max(initial=0.0)) + (0.0 if w["v_bias"] is None else float(w["v_bias"].max(initial=0.0)))
    bound = float(w["o_weight"].sum(axis=1).max(initial=0.0)) * vmax * (1 + 1e-4)
    bias = 0.0 if p.weights.o_bias is None else np.asarray(p.weights.o_bias, np.float64)
    dev = np.abs(np.asarray(y, np.float64) - bias)
    dev = np.where(np.isfinite(dev), dev, 0.0)
    if dev.size and dev.max() > bound:
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(dev), dev.shape))
        raise AssertionError(f"{what}: |y - b_O| = {dev[idx]:.4g} at {idx} is past {bound:.4g}, the most any "
                             f"attention weights can give (||W_O|| max|v|)")


def _check(impl, p, dtype: str, scale=None, query=None, key=None, value=None, what=""):
    q = p.query if query is None else query
    k, v = p.kv if key is None else (key, key if value is None else value)
    y, _ = call(impl, p, query=q, key=k, value=v, scale=scale)
    y_ref, _ = oracle.attention(p.weights, q, k, v, scale=scale, **p.masks(), **p.oracle_options())
    with np.errstate(over="ignore", invalid="ignore"):  # M may pass float64 (then nothing but NaN is compared)
        M = magnitude(p, y_ref, query=q, key=k, value=v, scale=scale)
    close(y, y_ref, tolerance.t1(dtype, M), f"output vs float64 oracle {what}")
    _hull(p, y, q, v, f"output {what}")


@prop("extreme_magnitudes", theme="numerics", problems=extreme_problems)
def extreme_magnitudes(impl, p):
    """Inputs up to float32's limit (|x| up to ~1e37, logits up to ~1e74, past float32's 3.4e38), and with
    "scale" scales up to float32's largest number on ordinary inputs: the output is finite, within the
    convex bound |y - b_O| <= ||W_O||_inf max|v|, and equals the float64 oracle within T1."""
    peak = float(np.abs(p.query).max(initial=0.0))
    _check(impl, p, "float32", what=f"(max|x| = {peak:.3g})")
    if "scale" in impl.features:
        rng = rng_of(p, 40)
        s = float(min(10.0 ** rng.uniform(1.0, np.log10(F32_MAX)), F32_MAX))
        k, v = p.kv
        unit = max(peak, 1e-30)  # the same directions at unit size
        q1, k1, v1 = ((x / unit).astype(np.float32) for x in (p.query, k, v))
        _check(impl, replace(p, query=q1, key=None if p.key is None else k1, value=None if p.value is None else v1),
               "float32", scale=s, query=q1, key=k1, value=v1, what=f"(scale = {s:.3g})")


@prop("float64_range", theme="numerics", problems=extreme_problems, dtype="float64", dtypes=("float64",))
def float64_range(impl, p):
    """In float64 (an implementation listing it in ``dtypes``, built with ``dtype="float64"``), inputs up
    to float64's limit (|x| up to ~1e306, logits far past 1e308): the output is finite, within the convex
    bound and equal to the float64 oracle (which never overflows: mha.testing.oracle) within T1 in
    float64's unit roundoff."""
    _check(impl, p, "float64", what=f"(float64, max|x| = {float(np.abs(p.query).max(initial=0.0)):.3g})")
