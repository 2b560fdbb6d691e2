"""Finite inputs whose logits leave float32's range (|x| ~ 1e20, or scale = 3e38) give no NaN of our own
making: the numpy fast path and the reference path (both backends) rescale by powers of two and stay
within the derived bound of the float64 answer. (MLX's fused kernel forms the logits in float32 and
gives NaN rows there, as mlx.nn and torch do: a documented limit, see the README.)"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import mha
import mha_cpu
from mha.testing import oracle, tolerance

from .helpers import random_weights

CASES = [(1e20, None, False), (1.0, 3e38, False), (3e19, None, True), (1e19, 1e10, True)]


def _problem(sigma, seed=0, B=2, T=6, E=12):
    return (sigma * np.random.default_rng(seed).standard_normal((B, T, E))).astype(np.float32)


def _check(y, layer, x, scale, what, **masks):
    ref = oracle.attention(layer.weights, x, x, x, scale=scale, **masks)[0]
    M = tolerance.magnitude(layer.weights, x, y_ref=ref, scale=scale)
    y = mha.to_numpy(y).astype(np.float64)
    assert np.isfinite(y).all(), f"{what}: NaN or inf"
    # the logit term of M is astronomically large here; the softmax is one-hot up to rounding, so the
    # output lies within the values' convex hull: bound by the value part of M without the logits
    Mv = tolerance.magnitude(layer.weights, x, y_ref=ref, scale=0.0)
    tolerance.assert_close(y, ref, min(tolerance.t1("float32", M), 4 * Mv), what)


@pytest.mark.parametrize("sigma,scale,causal", CASES)
@pytest.mark.parametrize("blocks", [None, (2, 3)])
@pytest.mark.parametrize("weights", [False, True])
def test_numpy_fast_path_rescales(sigma, scale, causal, blocks, weights):
    layer = mha.MultiHeadAttention(12, 3, backend="numpy", seed=1, scale=scale)
    x = _problem(sigma)
    with mha_cpu.small_blocks(*blocks) if blocks else contextlib.nullcontext():
        res = layer(x, causal=causal, return_weights=weights, return_lse=True)
    _check(res[0], layer, x, scale, f"numpy, blocks {blocks}", causal=causal)
    assert not np.isnan(res[-1]).any()  # lse itself may pass float32's range (then +-inf), never NaN
    if weights:
        assert np.isfinite(res[1]).all()
        np.testing.assert_allclose(res[1].sum(-1), 1.0, atol=2 * x.shape[1] * 2**-24)


@pytest.mark.parametrize("sigma,scale,causal", CASES)
def test_reference_path_rescales(backend, sigma, scale, causal):
    layer = mha.MultiHeadAttention(12, 3, backend=backend, seed=1, scale=scale)
    x = _problem(sigma, seed=1)
    y, w = layer(x, causal=causal, return_weights=True)  # MLX: the reference path
    _check(y, layer, x, scale, backend, causal=causal)
    assert np.isfinite(mha.to_numpy(w)).all()


def test_common_path_takes_no_rescaling(monkeypatch):
    """Ordinary inputs never reach the rescaled run (it would recompute the kernel)."""
    from mha_cpu import _layer

    layer = mha.MultiHeadAttention(12, 3, backend="numpy", seed=1)
    calls = []
    original = _layer._rescaled
    monkeypatch.setattr(_layer, "_rescaled", lambda q, k, D, rescale, own: calls.append(rescale)
                        or original(q, k, D, rescale, own))
    layer(_problem(3.0), _problem(3.0, seed=2)[:, :5])
    assert calls == [False]
    layer(_problem(1e20), _problem(1e20, seed=2)[:, :5])
    assert calls == [False, False, True]


def test_overflow_with_a_cache_appends_once():
    """A cached call whose logits overflow runs the kernel again on rescaled q and k, but projects and
    appends its tokens once: the cache's offset counts them once, and later steps (RoPE positions, the
    keys they see) equal the float64 oracle."""
    w = random_weights(12, 3, seed=4)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy", rope=mha.RoPE(dims=4))
    x = _problem(1.0, T=7).astype(np.float32)
    x[:, :3] *= np.float32(1e21)  # the prefill's logits leave float32's range
    cache = layer.init_cache(x.shape[0], None)
    out = [mha.to_numpy(layer(x[:, :3], cache=cache, causal=True))]
    assert cache.offset == 3
    out.append(mha.to_numpy(layer(x[:, 3:5], cache=cache, causal=True)))  # a chunk, after the cached ones
    for i in (5, 6):
        out.append(mha.to_numpy(layer(x[:, i:i + 1], cache=cache, causal=True)))
    assert cache.offset == 7
    got = np.concatenate(out, axis=1)
    want, _ = oracle.attention(w, x, causal=True, rope=mha.RoPE(dims=4))
    M = tolerance.magnitude(w, x[:, 3:], y_ref=want[:, 3:], max_angle=7.0)
    tolerance.assert_close(got[:, 3:], want[:, 3:], tolerance.t1("float32", M), "steps after an overflowing prefill")
