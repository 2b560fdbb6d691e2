"""How close to its precision's limit an implementation computes: :func:`measure`.

For each dtype an adapter supports (its ``dtypes``; float32 otherwise), seeded problems (no masks,
then key padding and causal) are rounded to that dtype, run through ``impl.build(weights, dtype=d)``
and compared with the float64 oracle on the *rounded* inputs, so that only the implementation's own
arithmetic counts. Each error is divided by the derived bound T1 = 4 u M (mha.testing.tolerance):
a ratio of 1 is the bound, and the suite fails above it. Reported per dtype: median, 99th
percentile and max over the problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import oracle, tolerance

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class NumericsRow:
    impl: str
    dtype: str
    examples: int
    median: float
    p99: float
    max: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def round_to(a, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` (to nearest even) and returned as float32 (exact)."""
    a = np.asarray(a, np.float32)
    if dtype in ("float32", "float64"):
        return a
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":  # round to nearest even on the upper 16 bits
        bits = a.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    raise ValueError(f"dtype must be one of float32, float64, float16, bfloat16, got {dtype!r}")


def _rounded_weights(weights, dtype):
    from .. import AttentionWeights

    d = {n: None if a is None else round_to(a, dtype) for n, a in weights.to_dict().items()}
    return AttentionWeights(**d, num_heads=weights.num_heads, num_kv_heads=weights.num_kv_heads)


def _problems(n: int, features):
    """Seeded problems: sizes cycling through odd, distinct shapes; masks by turns."""
    from .strategies import Config, random_inputs, random_weights

    sizes = [(2, 5, 7, 2, 3), (1, 9, 9, 3, 4), (3, 4, 6, 4, 2), (2, 8, 5, 2, 8), (1, 16, 16, 4, 4)]
    for i in range(n):
        B, T, S, H, D = sizes[i % len(sizes)]
        cross = "cross" in features
        cfg = Config(B, T, S if cross else T, H, H, D, H * D, H * D, "bias" in features, not cross)
        rng = np.random.default_rng([7, i])
        w = random_weights(cfg, rng)
        q, k, v = random_inputs(cfg, rng)
        masks = {}
        if i % 3 == 1 and "key_mask" in features:
            km = rng.random((B, cfg.S)) < 0.8
            km[:, 0] = True
            masks["key_mask"] = km
        if i % 3 == 2 and "causal" in features and T <= cfg.S:  # no empty rows, whatever the alignment
            masks["causal"] = True
        yield cfg, w, q, (q if k is None else k), (q if v is None else v), masks


def _to64(a) -> np.ndarray:
    try:
        return np.asarray(a, np.float64)
    except (TypeError, ValueError, RuntimeError):  # an mx.array in bfloat16
        import mlx.core as mx

        return np.asarray(a.astype(mx.float32), np.float64)


def measure(impl, *, dtypes=None, examples: int = 20, timeout: float | None = 60.0) -> list[NumericsRow]:
    """Error / derived bound per dtype for ``impl``: one :class:`NumericsRow` per dtype it supports
    (``impl.dtypes``, default ("float32",)), over ``examples`` problems. Each call must answer within
    ``timeout`` seconds with an array of the right shape and a real float dtype (mha.testing._guard;
    ImplementationError otherwise); a non-finite answer counts as an infinite ratio."""
    from ._guard import guard
    from .conventions import conventions_of

    impl = guard(impl, timeout, finite=None)
    align = conventions_of(impl)["causal"]
    supported = tuple(getattr(impl, "dtypes", ("float32",)))
    wanted = supported if dtypes is None else tuple(d for d in dtypes if d in supported)
    if not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be a positive int, got {examples!r}")
    rows = []
    for dtype in wanted:
        ratios = []
        for cfg, w, q, k, v, masks in _problems(examples, impl.features):
            w = _rounded_weights(w, dtype)
            q, k, v = (round_to(x, dtype) for x in (q, k, v))
            fn = impl.build(w) if dtype == "float32" else impl.build(w, dtype=dtype)
            with np.errstate(all="ignore"):
                y = _to64(fn(q, k, v, **masks))
            y_ref, _ = oracle.attention(w, q, k, v, causal_align=align, **masks)
            M = tolerance.magnitude(w, q, k, v, y_ref=y_ref)
            err = np.abs(y - y_ref).max() if np.isfinite(y).all() else np.inf
            ratios.append(float(err / tolerance.t1(dtype, M)))
        r = np.array(ratios)
        rows.append(NumericsRow(getattr(impl, "name", "impl"), dtype, len(r), float(np.median(r)),
                                float(np.percentile(r, 99)), float(r.max())))
    return rows
