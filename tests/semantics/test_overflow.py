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

from tests.conftest import BACKENDS
from tests.helpers import random_weights

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
    """Ordinary inputs never reach the rescaled run (it would recompute the kernel); inputs whose logits
    overflow run once more, on q and k scaled down by 2^E (E > 0)."""
    from mha_cpu import _kernel

    layer = mha.MultiHeadAttention(12, 3, backend="numpy", seed=1)
    calls = []
    original = _kernel.run
    monkeypatch.setattr(_kernel, "run", lambda call, flops: calls.append(call.E) or original(call, flops))
    layer(_problem(3.0), _problem(3.0, seed=2)[:, :5])
    assert calls == [0]
    layer(_problem(1e20), _problem(1e20, seed=2)[:, :5])
    layer(_problem(1e20), _problem(1e30, seed=2)[:, :5])
    assert len(calls) == 5 and calls[0] == calls[1] == calls[3] == 0 < calls[2] < calls[4]


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


@pytest.mark.parametrize("form", ["rope", "cache"])
def test_plain_form_moves_offsets_exactly(form):
    """Logits near 1e10 (far inside float32's range) through the plain, D-wide form of the kernel (RoPE,
    or a cache), in 1x1 blocks under a random mask: when a later block raised a row's maximum, its offset
    moved by a rounded difference, m + (max - m), which at these magnitudes misses the maximum by up to
    ulp(1e10) = 1024, so that the block's largest term was exp(+-1024): inf (a NaN row) or 0 (a row as
    if it saw no key). The offset is now the maximum itself: every row that sees a key is finite, and
    its lse too."""
    rng = np.random.default_rng(2)
    for trial in range(6):
        T = int(rng.integers(5, 12))
        layer = mha.MultiHeadAttention(4, 2, backend="numpy", seed=trial, rope=form == "rope")
        x = (1e10 * rng.standard_normal((1, T, 4))).astype(np.float32)
        m = rng.random((1, 1, T, T)) < 0.6
        m[..., np.arange(T), np.arange(T)] = True  # every row sees a key (itself)
        with mha_cpu.small_blocks(1, 1):
            if form == "rope":
                y, lse = layer(x, mask=m, causal=True, return_lse=True)
            else:
                cache = layer.init_cache(1)
                y, lse = layer(x, mask=m, causal=True, return_lse=True, cache=cache)
        assert np.isfinite(y).all() and np.isfinite(lse).all(), f"trial {trial}: a row lost its terms"
        _check(y, layer, x, None, f"{form}, trial {trial}", mask=m, causal=True)


def test_bias_in_the_units_of_folded_logits():
    """scale = 1e25 does not fold into W_q whole (it would overflow): the kernel computes logits 2^19
    times too small and multiplies them back at the exp; an additive mask was added to the small logits,
    so it counted 2^19 times too much (weights [0, 0, 0, 1] where the float64 answer is
    [0.019, 0.511, 0.406, 0.064]). Queries of 1e-25 make the logits of order 1."""
    layer = mha.MultiHeadAttention(8, 2, backend="numpy", seed=0, bias=False, scale=1e25)
    rng = np.random.default_rng(0)
    q = (1e-25 * rng.standard_normal((1, 3, 8))).astype(np.float32)
    kv = rng.standard_normal((1, 4, 8)).astype(np.float32)
    bias = np.array([0.0, 0.5, -0.5, 1.0], np.float32).reshape(1, 1, 1, 4)
    for blocks in (None, (2, 3)):
        with mha_cpu.small_blocks(*blocks) if blocks else contextlib.nullcontext():
            y, w = layer(q, kv, kv, mask=bias, return_weights=True)
            y_fast = layer(q, kv, kv, mask=bias)
        ref, P = oracle.attention(layer.weights, q, kv, kv, mask=bias, scale=1e25)
        tol = tolerance.weights_magnitude(layer.weights, q, kv, scale=1e25, mask=bias, P_ref=P)
        tolerance.assert_close(w, P, tolerance.t1("float32", tol), f"weights, blocks {blocks}")
        M = tolerance.magnitude(layer.weights, q, kv, kv, y_ref=ref, scale=1e25, mask=bias, P_ref=P)
        tolerance.assert_close(y_fast, ref, tolerance.t1("float32", M), f"output, blocks {blocks}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_in_the_units_of_rescaled_logits(backend):
    """Logits past float32's range (6.4e38 and 3.2e38) with a finite bias of -2e38 on the first key: the
    true logits are 4.4e38 and 3.2e38, so the first key takes all the weight. On numpy's rerun with q and k
    scaled down, and in MLX's fused and blockwise paths (q divided by 2^e), the bias was added unscaled
    and took it away (weights [0, 1]); with a bool key hidden beside it too."""
    eye = np.eye(2, dtype=np.float32)
    w = mha.AttentionWeights(eye, eye, eye, eye, num_heads=1)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    q = np.array([[[3e19, 0.0]]], np.float32)
    k = np.array([[[3e19, 0.0], [1.5e19, 0.0], [1.0, 0.0]]], np.float32)
    v = np.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], np.float32)
    for bias in (np.array([-2e38, 0.0, -np.inf], np.float32), np.array([-2e38, 0.0, np.finfo(np.float32).min])):
        bias = bias.reshape(1, 1, 1, 3)
        _, weights = layer(q, k, v, mask=bias, return_weights=True)
        np.testing.assert_array_equal(mha.to_numpy(weights)[0, 0, 0], [1.0, 0.0, 0.0])
        blockwise = contextlib.nullcontext()
        if backend == "mlx":
            import mha_mlx

            blockwise = mha_mlx.options.override(score_bytes=0)
        for route in (contextlib.nullcontext(), blockwise):
            with route:
                np.testing.assert_array_equal(mha.to_numpy(layer(q, k, v, mask=bias))[0, 0], [1.0, 0.0])


@pytest.mark.parametrize("sigma,scale,tiny_keys", [(1e20, None, False), (1.0, 1e30, False), (1.0, 1e30, True)])
def test_softcap_caps_the_true_logits_when_rescaled(sigma, scale, tiny_keys):
    """With a soft-cap, c tanh(l / c) is taken on the true logits even when the kernel holds them in units of
    2^E: q.k overflowing float32 (|x| ~ 1e20: products of +-inf lose the sign) or a huge scale. With keys
    of ~1e-13 under scale 1e30 the logits in units of 2^E are of the cap's size while the true ones
    (~1e17) saturate it: tanh of the scaled logits would soften a softmax the cap leaves flat."""
    from mha.testing.properties._common import edit_weights

    x = _problem(sigma, seed=3)
    layer = mha.MultiHeadAttention(12, 3, backend="numpy", seed=2, softcap=5.0, scale=scale)
    if tiny_keys:
        w = layer.weights
        layer = mha.MultiHeadAttention.from_weights(edit_weights(w, k_weight=w.k_weight * 1e-13, k_bias=w.k_bias * 1e-13),
                                                    backend="numpy", softcap=5.0, scale=scale)
    y, w = layer(x, return_weights=True)
    ref, P = oracle.attention(layer.weights, x, x, x, scale=scale, softcap=5.0)
    assert np.isfinite(y).all()
    tolerance.assert_close(w, P, 1e-4, "weights with a soft-cap, rescaled logits")
    tolerance.assert_close(y, ref, tolerance.t1("float32", tolerance.magnitude(layer.weights, x, y_ref=ref, scale=0.0)),
                           "output with a soft-cap, rescaled logits")
