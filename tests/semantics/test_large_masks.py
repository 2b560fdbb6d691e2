"""Additive masks as people really write them: Hugging Face's finfo(float32).min, -1e9, float16's lowest,
MLX's own additive causal mask, together with key_mask and causal, in every dtype of each backend.

A finite bias weighs a key down but hides nothing (only -inf hides): a query whose visible keys all carry
it shares its weight among exactly those keys, never with a hidden one.
"""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.testing import oracle, tolerance

from tests.conftest import BACKENDS

FINFO32_MIN = float(np.finfo(np.float32).min)
DTYPES = [(b, d) for b in BACKENDS for d in mha._validate.BACKEND_DTYPES[b]]


def _x(shape, seed, sigma=1.0):
    return (sigma * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _layer(backend, dtype, E=16, H=2, seed=0, **kw):
    return mha.MultiHeadAttention(E, H, backend=backend, dtype=dtype, seed=seed, **kw)


@pytest.mark.parametrize("backend,dtype", DTYPES)
@pytest.mark.parametrize("fill", [FINFO32_MIN, -1e9, -65504.0, -1e4])
def test_padding_bias_keeps_causality(backend, dtype, fill):
    """The issue's case: keys 0 and 1 padded by a large finite bias, causal=True. Query 0 sees only key 0
    (its bias is finite, so it is visible); the future (token 4) must not reach it."""
    x = _x((1, 5, 16), 0)
    pad = np.where([1, 1, 0, 0, 0], fill, 0).astype(np.float32)
    x2 = x.copy()
    x2[0, 4] += 5
    layer = _layer(backend, dtype)
    y = mha.to_numpy(layer(x, mask=pad, causal=True))
    y2 = mha.to_numpy(layer(x2, mask=pad, causal=True))
    np.testing.assert_array_equal(y2[0, :4], y[0, :4])
    # asking for weights takes another path: equal within the bound of two evaluations (the bias is in
    # M: it is where a logit's rounding grows)
    y_w, _ = layer(x, mask=pad, causal=True, return_weights=True)
    ref = oracle.attention(layer.weights, x, x, x, mask=pad, causal=True)[0]
    M = tolerance.magnitude(layer.weights, x, y_ref=ref, mask=pad)
    tolerance.assert_close(mha.to_numpy(y_w), y, tolerance.t2(dtype, dtype, M), "weights path vs fast path")
    # query 0 sees key 0 alone: its weight is 1 whatever the bias, so its output is exact up to rounding
    M0 = tolerance.magnitude(layer.weights, x, y_ref=ref)
    tolerance.assert_close(y[0, 0], ref[0, 0], 2 * tolerance.t1(dtype, M0), "query 0 vs float64")


@pytest.mark.parametrize("backend,dtype", DTYPES)
@pytest.mark.parametrize("fill", [FINFO32_MIN, -1e9, -1e4])
def test_row_of_large_negatives_is_not_empty(backend, dtype, fill):
    """A query whose every key carries the same large finite bias is not empty: it averages over all its
    keys (here: the values themselves, with scale 0, so every logit ties exactly), never NaN; in float16,
    -1e9 is beyond the dtype's range but must not become a -inf that hides the keys."""
    x = _x((2, 5, 16), 1)
    m = np.zeros((2, 1, 5, 5), np.float32)
    m[0, 0, 2, :] = fill
    m[1, 0, :, 1] = fill
    layer = _layer(backend, dtype, scale=0.0)
    y = mha.to_numpy(layer(x, mask=m)).astype(np.float64)
    assert np.isfinite(y).all()
    # scale 0: row (0, 2) ties on every key -> the mean of all values; batch 1's key 1 weighs nothing
    ref0 = oracle.attention(layer.weights, x, x, x, scale=0.0)[0]
    hide1 = np.ones((2, 5), bool)
    hide1[:, 1] = False
    ref1 = oracle.attention(layer.weights, x, x, x, key_mask=hide1, scale=0.0)[0]
    M = tolerance.magnitude(layer.weights, x, y_ref=ref0)
    tolerance.assert_close(y[0, 2], ref0[0, 2], 2 * tolerance.t1(dtype, M), "a row of large negatives")
    tolerance.assert_close(y[1], ref1[1], 2 * tolerance.t1(dtype, M), "a column of large negatives")


@pytest.mark.parametrize("backend,dtype", DTYPES)
def test_mlx_style_additive_causal_mask_with_key_mask(backend, dtype):
    """mlx.nn.MultiHeadAttention.create_additive_causal_mask (-1e9 above the diagonal) with key_mask:
    equal to causal=True with that key_mask wherever a row keeps a visible key of bias 0."""
    x = _x((2, 6, 16), 2)
    causal_bias = (np.triu(np.ones((6, 6)), 1) * -1e9).astype(np.float32)
    km = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
    layer = _layer(backend, dtype)
    y_bias = mha.to_numpy(layer(x, mask=causal_bias, key_mask=km)).astype(np.float64)
    y_causal = mha.to_numpy(layer(x, causal=True, key_mask=km)).astype(np.float64)
    rows = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], bool)  # batch 1's rows 0, 1 see only future keys
    ref = oracle.attention(layer.weights, x, x, x, causal=True, key_mask=km)[0]
    M = tolerance.magnitude(layer.weights, x, y_ref=ref)
    tolerance.assert_close(y_bias[rows], y_causal[rows], tolerance.t2(dtype, dtype, M), "additive causal vs causal")
    # and the future of row 2 of batch 1 does not reach it
    x2 = x.copy()
    x2[1, 4:] += 3
    y2 = mha.to_numpy(layer(x2, mask=causal_bias, key_mask=km))
    np.testing.assert_array_equal(y2[1, 2:4], mha.to_numpy(layer(x, mask=causal_bias, key_mask=km))[1, 2:4])


def test_float16_logits_beyond_65504_stay_finite():
    """Half precision on MLX: the softmax runs in float32, so logits past float16's range (65504) are
    no reason for NaN; the result is within the float16 bound of the float64 one."""
    pytest.importorskip("mlx.core")
    x = _x((1, 4, 16), 3, sigma=1000.0)
    layer = _layer("mlx", "float16")
    y = mha.to_numpy(layer(x)).astype(np.float64)
    q, k, _ = oracle.head_projections(layer.weights, x, x, x)
    logits = max((qh @ kh.transpose(0, 2, 1)).max() for qh, kh in zip(q, k)) * layer.scale
    assert logits > 65504  # the largest logit leaves float16's range
    ref = oracle.attention(layer.weights, x, x, x)[0]
    M = tolerance.magnitude(layer.weights, x, y_ref=ref)
    assert np.isfinite(y).all()
    tolerance.assert_close(y, ref, 2 * tolerance.t1("float16", M), "float16 with large logits")


@pytest.mark.parametrize("fill", [FINFO32_MIN, -1e9])
def test_mlx_gradients_finite_with_empty_rows_and_large_bias(fill):
    """Training through rows that see nothing and rows of a large bias: gradients stay finite."""
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as nn

    import mha_mlx

    layer = mha_mlx.MultiHeadAttention(16, 2, seed=0)
    x = mx.array(_x((2, 5, 16), 4))
    m = np.zeros((2, 1, 5, 5), np.float32)
    m[0, 0, 1, :] = -np.inf  # an empty row
    m[1, 0, :, :2] = fill
    km = np.array([[1] * 5, [0, 1, 1, 1, 1]], bool)
    mask, kmask = mx.array(m), mx.array(km)
    loss_and_grad = nn.value_and_grad(layer, lambda mod: (mod(x, mask=mask, key_mask=kmask, causal=True) ** 2).sum())
    loss, grads = loss_and_grad(layer)
    flat = [g for _, g in nn.utils.tree_flatten(grads)]
    assert np.isfinite(float(loss)) and all(np.isfinite(np.array(g)).all() for g in flat)


def _padding(B, S, lengths, fill, left=True):
    """Hugging Face's (B, 1, 1, S) padding bias: ``fill`` on the first (or last) lengths[b] keys."""
    m = np.zeros((B, 1, 1, S), np.float32)
    for b, n in enumerate(lengths):
        (m[b, ..., :n] if left else m[b, ..., S - n:S])[...] = fill
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [FINFO32_MIN, -1e9, -1e4])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_padding_in_whole_key_blocks(backend, fill, left):
    """Blockwise (2-query, 3-key blocks), padding that fills whole key blocks before (left padding) or
    after (right) the real keys. A row whose first block held only padding was centred on the fill
    (offset -3.4e38 or -1e9), the real keys' logits computed relative to it lost every digit of q.k, and
    the real keys all got the same weight: 1.5 (finfo.min), 4.0 (-1e9) and 3e-4 (-1e4) off the float64
    oracle on the numpy kernel. Bound per row (tolerance.mask_term): the fill's keys have weight 0."""
    B, T, S, E, H = 3, 5, 11, 12, 2
    x, kv = _x((B, T, E), 2), _x((B, S, E), 3)
    pad = _padding(B, S, [4, 7, 0], fill, left)
    layer = _layer(backend, "float32", E=E, H=H)
    with layer.small_blocks(2, 3):
        y = mha.to_numpy(layer(x, kv, kv, mask=pad))
    ref, P = oracle.attention(layer.weights, x, kv, kv, mask=pad)
    M = tolerance.magnitude(layer.weights, x, kv, kv, y_ref=ref, mask=pad, P_ref=P)
    M0 = tolerance.magnitude(layer.weights, x, kv, kv, y_ref=ref)
    assert float(M.max()) <= M0 * (1 + 1e-12)  # no row of all padding: the bound of no mask at all
    tolerance.assert_close(y, ref, tolerance.t1("float32", M), f"padding of {fill} ({'left' if left else 'right'})")


def test_padding_over_a_long_sequence_with_default_blocks():
    """The same at default settings: 600 keys of finfo.min left padding (more than one 512-key block) in
    front of 3600 real keys, 520 queries (past the single-pass limits, so the online softmax runs); one
    head, against softmax(q k^T s + A) v in float64 over the oracle's head projections (the per-head loop
    oracle takes seconds at this size)."""
    S, T, E = 4200, 520, 16
    x, kv = _x((1, T, E), 4), _x((1, S, E), 5)
    pad = _padding(1, S, [600], FINFO32_MIN)
    layer = _layer("numpy", "float32", E=E, H=1)
    y = mha.to_numpy(layer(x, kv, kv, mask=pad))
    w = layer.weights
    (q,), (k,), (v,) = oracle.head_projections(w, x, kv, kv)
    logits = q[0] @ k[0].T / np.sqrt(E) + pad[0, 0].astype(np.float64)
    P = np.exp(logits - logits.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    ref = (P @ v[0]) @ w.o_weight.T.astype(np.float64) + w.o_bias
    M = tolerance.magnitude(w, x, kv, kv, y_ref=ref[None], mask=pad, P_ref=P[None, None])
    tolerance.assert_close(y, ref[None], tolerance.t1("float32", M), "long sequence, padding of finfo.min")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [float(np.finfo(np.float64).min), -1e300, -1e39])
def test_float64_fill_beyond_float32_stays_visible(backend, fill):
    """A float64 mask filled with finfo(float64).min (Hugging Face's padding fill in float64 models) or
    -1e300 is finite: it must not become -inf on the way to float32, which would hide the keys (a row of
    it then gave the output bias, not the mean over its keys). Clipped to float32's range, it behaves as
    finfo(float32).min does; +1e39 (finite, not +inf) is taken too."""
    x = _x((2, 5, 16), 7)
    m = np.zeros((2, 1, 1, 5))
    m[0] = fill  # batch 0: every key carries it
    m[1, ..., :2] = fill  # batch 1: two padded keys
    layer = _layer(backend, "float32")
    got = mha.to_numpy(layer(x, mask=m))
    want = mha.to_numpy(layer(x, mask=np.maximum(m, FINFO32_MIN).astype(np.float32)))
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got[0], layer.weights.o_bias)  # not an empty row
    assert np.isfinite(mha.to_numpy(layer(x, mask=np.where(m == 0, 0.0, 1e39)))).all()
