"""Decoding: RoPE against mlx.nn.RoPE, the key/value cache (growing, preallocated, rotating), windows,
and their errors. The properties (cached_decoding, rope_relative_positions, window_*) run in
test_properties on both backends; these are the cases a property does not draw."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha
from mha._rope import apply_rope
from mha.testing import tolerance

from tests.helpers import normal, random_weights


def _layer(backend, E=24, H=6, Hkv=2, seed=3, **kw):
    return mha.MultiHeadAttention.from_weights(random_weights(E, H, Hkv=Hkv, seed=seed), backend=backend, **kw)


def _decode(layer, x, chunks, cache, key_mask=None):
    outs = []
    for a, b in chunks:
        kw = {} if key_mask is None else {"key_mask": key_mask[:, a:b]}
        outs.append(mha.to_numpy(layer(x[:, a:b], cache=cache, causal=True, **kw)).astype(np.float64))
    return np.concatenate(outs, axis=1)


def _tol(layer, x, y, max_angle=0.0):
    M = tolerance.magnitude(layer.weights, x, y_ref=y, max_angle=max_angle)
    return tolerance.t2("float32", "float32", M)


# -- RoPE -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims,base,scale", [(10, 10000.0, 1.0), (6, 500.0, 0.5), (4, 2.5, 3.0)])
@pytest.mark.parametrize("offset", [0, 7, 300])
def test_rope_matches_mlx_nn_rope(traditional, dims, base, scale, offset):
    """mha's RoPE (the reference's xp-generic one, float64 and float32) = mlx.nn.RoPE with the same
    settings, on (B, H, L, D) = (2, 3, 37, 10): split-half and traditional layouts, partial rotation."""
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    x = normal((2, 3, 37, 10), 0)
    rope = mha.RoPE(dims=dims, base=base, traditional=traditional, scale=scale)
    theirs = np.array(nn.RoPE(dims, traditional=traditional, base=base, scale=scale)(mx.array(x), offset=offset))
    ours64 = apply_rope(np, x.astype(np.float64), rope, offset)
    ours32 = apply_rope(np, x, rope, offset)
    ours_mx = np.array(apply_rope(mx, mx.array(x), rope, offset))
    # MLX computes the angle in float32: |d theta| <= u theta_max per coordinate pair, times |x| (<= 5 here)
    theta_max = (offset + 36) * scale
    bound = 4 * 2.0**-24 * (theta_max + 2) * float(np.abs(x).max()) * 2
    for ours in (ours64, ours32, ours_mx):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=bound)
    assert ours32.dtype == np.float32 and ours64.dtype == np.float64
    np.testing.assert_array_equal(ours64[..., dims:], x[..., dims:])  # the rest passes unchanged


def test_mlx_layer_uses_the_fused_rope_kernel_equal_to_nn_rope():
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    layer = _layer("mlx", rope=mha.RoPE(fraction=0.5, base=100.0, traditional=True))
    x = mx.array(normal((1, 6, 5, 4), 1))
    np.testing.assert_array_equal(np.array(layer._rope(x, 11)),
                                  np.array(nn.RoPE(2, traditional=True, base=100.0)(x, offset=11)))


def test_rope_layer_matches_manual_attention_with_mlx_nn_rope(backend):
    """A layer with RoPE = float64 attention whose projected q and k were rotated by mlx.nn.RoPE
    (queries at positions S - T .. S - 1, keys at 0 .. S - 1), causal."""
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    E, H, T = 24, 4, 9
    w = random_weights(E, H, seed=5)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend, rope=mha.RoPE(base=50.0))
    x = normal((2, T, E), 2)
    y = mha.to_numpy(layer(x, causal=True)).astype(np.float64)
    D = E // H
    rope = nn.RoPE(D, base=50.0)

    def heads(W, b):
        return (x.astype(np.float64) @ W.T + b).reshape(2, T, H, D).transpose(0, 2, 1, 3)

    q = np.array(rope(mx.array(heads(w.q_weight, w.q_bias).astype(np.float32))), np.float64)
    k = np.array(rope(mx.array(heads(w.k_weight, w.k_bias).astype(np.float32))), np.float64)
    v = heads(w.v_weight, w.v_bias)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = (p @ v).transpose(0, 2, 1, 3).reshape(2, T, E) @ w.o_weight.T + w.o_bias
    np.testing.assert_allclose(y, expected, rtol=0, atol=_tol(layer, x, expected, max_angle=T))


def test_rope_settings_are_checked():
    with pytest.raises(ValueError, match="rope fraction must be in"):
        mha.RoPE(fraction=0.0)
    with pytest.raises(ValueError, match="rope dims must be an even int"):
        mha.RoPE(dims=3)
    with pytest.raises(TypeError, match="rope base must be a finite float"):
        mha.RoPE(base="big")
    with pytest.raises(TypeError, match="rope must be None, True, an mha.RoPE or a dict"):
        mha.MultiHeadAttention(8, 2, backend="numpy", rope="yes")
    with pytest.raises(ValueError, match="unknown settings"):
        mha.MultiHeadAttention(8, 2, backend="numpy", rope={"theta": 3})
    with pytest.raises(ValueError, match="rotates fewer than 2"):
        mha.MultiHeadAttention(8, 8, backend="numpy", rope=True)  # head_dim 1
    with pytest.raises(ValueError, match="rope dims=6 exceeds head_dim=4"):
        mha.MultiHeadAttention(8, 2, backend="numpy", rope=mha.RoPE(dims=6))
    layer = mha.MultiHeadAttention(8, 2, backend="numpy", rope={"base": 500, "traditional": True})
    assert layer.rope == mha.RoPE(base=500.0, traditional=True)
    assert "rope=RoPE(" in repr(layer)


# -- the cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_length", [None, 40])
def test_cache_decoding_equals_full_pass_with_everything(backend, max_length):
    """GQA, RoPE (traditional, half the dims), a window, left padding, a prefill then single tokens."""
    layer = _layer(backend, rope=mha.RoPE(fraction=0.5, traditional=True, base=100.0), window=6)
    B, T = 3, 23
    x = normal((B, T, 24), 4)
    km = np.arange(T)[None, :] >= np.array([[0], [3], [7]])
    full = mha.to_numpy(layer(x, causal=True, key_mask=km)).astype(np.float64)
    cache = layer.init_cache(B, max_length)
    chunks = [(0, 5)] + [(t, t + 1) for t in range(5, 14)] + [(14, 17), (17, 23)]
    y = _decode(layer, x, chunks, cache, km)
    np.testing.assert_allclose(y, full, rtol=0, atol=_tol(layer, x, full, max_angle=T))
    assert cache.offset == T and cache.kept == 6 + 5  # window - 1 old positions plus the last chunk


def test_rotating_cache_memory_stays_bounded(backend):
    layer = _layer(backend, window=8, rope=True)
    T = 150
    x = normal((1, T, 24), 5)
    cache = layer.init_cache(1)
    y = _decode(layer, x, [(t, t + 1) for t in range(T)], cache)
    full = mha.to_numpy(layer(x, causal=True)).astype(np.float64)
    np.testing.assert_allclose(y, full, rtol=0, atol=_tol(layer, x, full, max_angle=T))
    assert cache.capacity == 16 and cache.kept == 8 and cache.offset == T


def test_rotating_cache_shrinks_back_after_a_long_prefill(backend):
    layer = _layer(backend, window=8)
    x = normal((1, 105, 24), 14)
    cache = layer.init_cache(1)
    y = _decode(layer, x, [(0, 100)] + [(t, t + 1) for t in range(100, 105)], cache)
    assert cache.capacity == 16 and cache.kept == 8
    full = mha.to_numpy(layer(x, causal=True)).astype(np.float64)
    np.testing.assert_allclose(y, full, rtol=0, atol=_tol(layer, x, full))


def test_growing_cache_grows_in_steps(backend):
    layer = _layer(backend)
    x = normal((2, 300, 24), 6)
    cache = layer.init_cache(2)
    assert cache.capacity == 256
    y = _decode(layer, x, [(0, 250), (250, 251), (251, 300)], cache)
    full = mha.to_numpy(layer(x, causal=True)).astype(np.float64)
    np.testing.assert_allclose(y, full, rtol=0, atol=_tol(layer, x, full))
    assert cache.capacity == 512 and cache.kept == 300


def test_cache_weights_unbatched_and_reset(backend):
    layer = _layer(backend, rope=True)
    x = normal((7, 24), 7)  # unbatched
    cache = layer.init_cache(1, 7)
    _decode(layer, x[None], [(0, 4)], cache)
    y, w = layer(x[4:], cache=cache, causal=True, return_weights=True)
    full_y, full_w = layer(x, causal=True, return_weights=True)
    assert mha.to_numpy(w).shape == (6, 3, 7)
    full_y = mha.to_numpy(full_y).astype(np.float64)
    tol_y = _tol(layer, x[None], full_y[None], max_angle=7)
    MP = tolerance.weights_magnitude(layer.weights, x[None], max_angle=7)
    np.testing.assert_allclose(mha.to_numpy(w), mha.to_numpy(full_w)[:, 4:], rtol=0, atol=2 * tolerance.t1("float32", MP))
    np.testing.assert_allclose(mha.to_numpy(y), full_y[4:], rtol=0, atol=tol_y)
    cache.reset()
    again = _decode(layer, x[None], [(0, 7)], cache)
    np.testing.assert_allclose(again[0], full_y, rtol=0, atol=tol_y)


def test_backends_decode_alike():
    pytest.importorskip("mlx.core")
    x = normal((2, 12, 24), 8)
    outs = []
    for backend in ("numpy", "mlx"):
        layer = _layer(backend, rope=mha.RoPE(base=30.0), window=5)
        outs.append(_decode(layer, x, [(0, 3)] + [(t, t + 1) for t in range(3, 12)], layer.init_cache(2)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=_tol(_layer("numpy"), x, outs[0], max_angle=12))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mlx_half_precision_cache_stays_half(dtype):
    mx = pytest.importorskip("mlx.core")
    layer = _layer("mlx", dtype=dtype, rope=True)
    x = normal((1, 9, 24), 9)
    cache = layer.init_cache(1)
    y = _decode(layer, x, [(0, 4)] + [(t, t + 1) for t in range(4, 9)], cache)
    assert cache.keys.dtype == getattr(mx, dtype) and cache.values.dtype == getattr(mx, dtype)
    assert layer(x[:, :1], cache=layer.init_cache(1), causal=True).dtype == getattr(mx, dtype)
    full = mha.to_numpy(layer(x, causal=True)).astype(np.float64)
    M = tolerance.magnitude(layer.weights, x, y_ref=full, max_angle=9)
    np.testing.assert_allclose(y, full, rtol=0, atol=tolerance.t2(dtype, dtype, M))


def test_cache_errors_name_the_argument_and_change_nothing(backend):
    layer = _layer(backend)
    x = normal((2, 3, 24), 10)
    cache = layer.init_cache(2, max_length=4)
    layer(x, cache=cache, causal=True)
    with pytest.raises(ValueError, match=r"cache is full: it holds 3 of max_length=4 positions and 3 more"):
        layer(x, cache=cache, causal=True)
    assert cache.offset == 3 and cache.kept == 3
    with pytest.raises(ValueError, match=r"key_mask \(of the new tokens, with cache=\) must have shape \(B, T\)"):
        layer(x[:, :1], cache=cache, key_mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="cache holds batch_size=2 but the query has batch size 1"):
        layer(x[:1, :1], cache=cache)
    with pytest.raises(TypeError, match="cache= is for self-attention"):
        layer(x[:, :1], x[:, :1], cache=cache)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        layer(x[:, :1], cache={"k": 1})
    other = _layer(backend, Hkv=3)
    with pytest.raises(ValueError, match="cache was made for another kind of layer .*num_kv_heads: cache 2, layer 3"):
        other(x[:, :1], cache=cache)
    assert cache.offset == 3
    with pytest.raises(ValueError, match="init_cache needs a self-attention layer"):
        mha.MultiHeadAttention(24, 6, kdim=5, backend=backend).init_cache(1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        layer.init_cache(0)
    with pytest.raises(TypeError, match="max_length must be a positive int"):
        layer.init_cache(1, 2.5)


def test_cache_from_the_other_backend_is_refused():
    pytest.importorskip("mlx.core")
    cache = _layer("numpy").init_cache(1)
    with pytest.raises(ValueError, match="backend: cache 'numpy', layer 'mlx'"):
        _layer("mlx")(normal((1, 1, 24), 0), cache=cache)


# -- windows --------------------------------------------------------------------------------------
def test_window_is_checked_and_kept_by_to_and_prune(backend):
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        mha.MultiHeadAttention(8, 2, backend=backend, window=0)
    with pytest.raises(TypeError, match="window must be a positive int"):
        mha.MultiHeadAttention(8, 2, backend=backend, window=2.5)
    layer = _layer(backend, window=4, rope=mha.RoPE(base=77.0))
    assert layer.to("numpy").window == 4 and layer.to("numpy").rope.base == 77.0
    pruned = mha.prune_heads(layer, [1])
    assert pruned.window == 4 and pruned.rope == layer.rope


def test_window_weights_are_a_band(backend):
    layer = _layer(backend, window=3)
    _, w = layer(normal((1, 8, 24), 11), causal=True, return_weights=True)
    w = mha.to_numpy(w)
    i, j = np.indices((8, 8))
    assert (w[..., (j > i) | (i - j >= 3)] == 0).all()
    assert (w[..., (j <= i) & (i - j < 3)] > 0).all()


def test_window_on_long_sequences_uses_blocks_and_skips_keys():
    """numpy fast path with many keys: the blockwise online softmax with a window equals the band mask."""
    import mha_cpu

    layer = _layer("numpy", window=50)
    x = normal((1, 700, 24), 12)
    with mha_cpu.small_blocks(64, 64, threads=2):
        y = mha.to_numpy(layer(x, causal=False)).astype(np.float64)
    i, j = np.indices((700, 700))
    plain = _layer("numpy")
    expected = mha.to_numpy(plain(x, mask=np.abs(i - j) < 50)).astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=0, atol=_tol(plain, x, expected))


def test_rope_layer_trains_with_mlx_grad():
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    layer = _layer("mlx", rope=True, window=4)
    x = mx.array(normal((2, 6, 24), 13))

    def loss(model):
        return (model(x, causal=True) ** 2).mean()

    value, grads = nn.value_and_grad(layer, loss)(layer)
    g = grads["q_proj"]["weight"]
    assert np.isfinite(np.array(g)).all() and float(mx.abs(g).sum()) > 0
