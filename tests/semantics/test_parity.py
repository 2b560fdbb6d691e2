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


def _reference64(layer, p):
    """mha.reference.multi_head_attention in float64 (numpy) from the layer's own weights, on the problem's
    inputs and masks: the readable algorithm, sharing nothing with the fast paths but the MaskSet."""
    from mha import _masks, _prepare

    ref = mha.MultiHeadAttention.from_weights(layer.weights, backend="numpy", dtype="float64", rope=layer.rope,
                                              window=layer.window)
    k, v = p.kv
    call = _prepare.prepare(ref, p.query, k, v, **{**dict(mask=None, key_mask=None, causal=False, head_mask=None,
                                                          training=False, check_finite=False, cache=None),
                                                   **p.masks(), "return_weights": False, "return_lse": False})
    c = ref.config
    params = {n: None if a is None else np.asarray(a, np.float64) for n, a in layer.weights.to_dict().items()}
    out, _, _ = reference.multi_head_attention(
        np, call.query, call.key, call.value, params, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
        scale=c.effective_scale, masks=call.masks, rope=c.rope, q_offset=call.pos.q_offset,
        k_offset=call.pos.k_offset, return_weights=False)
    assert isinstance(call.masks, _masks.MaskSet)
    return out


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@given(p=mst.problems(ALL | {"rope", "window"}, positional=True))
def test_fast_path_equals_the_reference(backend, p):
    """The layer's fast path (numpy's core, MLX's fused or blockwise kernel) against the reference algorithm in
    float64 computed from the layer's own weights, within T1."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    layer = mha.MultiHeadAttention.from_weights(p.weights, backend=backend, **p.layer_options())
    k, v = p.kv
    y = mha.to_numpy(layer(p.query, k, v, **p.masks())).astype(np.float64)
    y_ref = _reference64(layer, p)
    M = tolerance.magnitude(p.weights, p.query, k, v, y_ref=y_ref, mask=p.mask, max_angle=p.max_angle())
    tolerance.assert_close(y, y_ref, tolerance.t1("float32", M), f"{backend} fast path vs the reference")


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
