"""Fast paths against the xp-generic reference, backend against backend, half precision against float32.

Every comparison is to a float64 value or within the derived bound T2 = T1(a) + T1(b).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mha
from mha import reference
from mha.testing import oracle, strategies as mst, tolerance

ALL = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "gqa"})


def _run(backend, p, dtype="float32", return_weights=False):
    layer = mha.MultiHeadAttention.from_weights(p.weights, backend=backend, dtype=dtype)
    k, v = p.kv
    out = layer(p.query, k, v, return_weights=return_weights, **p.masks())
    return mha.to_numpy(out[0] if return_weights else out).astype(np.float64)


@given(mst.problems(ALL))
def test_numpy_fast_path_equals_reference_path(p):
    y_fast, y_ref = _run("numpy", p), _run("numpy", p, return_weights=True)
    M = tolerance.magnitude(p.weights, p.query, *p.kv, y_ref=y_ref, mask=p.mask)
    tolerance.assert_close(y_fast, y_ref, tolerance.t2("float32", "float32", M), "numpy fast vs reference path")


@given(mst.problems(ALL))
def test_mlx_fused_path_equals_reference_path(p):
    pytest.importorskip("mlx.core")
    y_fast, y_ref = _run("mlx", p), _run("mlx", p, return_weights=True)
    M = tolerance.magnitude(p.weights, p.query, *p.kv, y_ref=y_ref, mask=p.mask)
    tolerance.assert_close(y_fast, y_ref, tolerance.t2("float32", "float32", M), "mlx fused vs reference path")


@given(mst.problems(ALL))
def test_backends_agree(p):
    pytest.importorskip("mlx.core")
    y_np, y_mx = _run("numpy", p), _run("mlx", p)
    M = tolerance.magnitude(p.weights, p.query, *p.kv, y_ref=y_np, mask=p.mask)
    tolerance.assert_close(y_mx, y_np, tolerance.t2("float32", "float32", M), "mlx vs numpy")


@given(mst.problems(ALL, modes=("normal",)), st.sampled_from(["float16", "bfloat16"]))
def test_half_precision_within_stated_bound(p, dtype):
    """|y_half - y_64| <= 2 T1(half): T1 for the arithmetic, as much again for rounding x and W to half.
    (u = 2^-11 for float16, 2^-8 for bfloat16.)"""
    pytest.importorskip("mlx.core")
    y64, _ = oracle.attention(p.weights, p.query, *p.kv, **p.masks())
    M = tolerance.magnitude(p.weights, p.query, *p.kv, y_ref=y64, mask=p.mask)
    for rw in (False, True):
        y = _run("mlx", p, dtype=dtype, return_weights=rw)
        assert np.isfinite(y).all()
        tolerance.assert_close(y, y64, 2 * tolerance.t1(dtype, M), f"{dtype} (weights={rw}) vs float64")


@given(st.integers(1, 3), st.integers(0, 6), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31))
def test_split_merge_round_trip_and_head_columns(B, L, H, D, seed):
    x = np.random.default_rng(seed).normal(size=(B, L, H * D)).astype(np.float32)
    namespaces = [np]
    try:
        import mlx.core as mx

        namespaces.append(mx)
    except ImportError:
        pass
    for xp in namespaces:
        xs = xp.array(x) if xp is not np else x
        heads = reference.split_heads(xs, H)  # (B, H, L, D)
        assert tuple(heads.shape) == (B, H, L, D)
        np.testing.assert_array_equal(np.array(reference.merge_heads(heads)), x)
        for h in range(H):  # head h owns columns h*D:(h+1)*D
            np.testing.assert_array_equal(np.array(heads[:, h]), x[..., h * D:(h + 1) * D])
