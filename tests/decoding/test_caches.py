"""Caches: a rotating cache (max_cache) equals a sliding window, its first ``keep`` positions are never
evicted, its positions are recorded, chunks of new tokens see what a token-by-token decode sees, and
buffers grow geometrically (an unbounded cache) or stay bounded (a rotating one)."""

from __future__ import annotations

import numpy as np
import pytest

import mha

from tests.helpers import normal, random_weights

E, H, Hkv = 24, 4, 2


def _layer(backend="numpy", **kw):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    return mha.MultiHeadAttention.from_weights(random_weights(E, H, Hkv=Hkv, seed=3), backend=backend, **kw)


def _decode(layer, x, cache, chunks):
    """Feed x (B, T, E) through ``cache`` in chunks of the given sizes: (outputs, per-chunk weights and
    the cache's positions after each chunk)."""
    outs, steps, t = [], [], 0
    for n in chunks:
        y, w = layer(x[:, t:t + n], cache=cache, causal=True, return_weights=True)
        outs.append(mha.to_numpy(y))
        steps.append((mha.to_numpy(w), cache.positions))
        t += n
    return np.concatenate(outs, axis=1), steps


def _rule(T, M, keep):
    """(T, T) bool: what query p sees in a rotating cache of M keeping the first ``keep``: j <= p, and
    j < keep or p - j < M - keep."""
    p, j = np.indices((T, T))
    return (j <= p) & ((j < keep) | (p - j < M - keep))


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("chunks", [[1] * 13, [5, 1, 1, 3, 1, 2], [13]], ids=["steps", "mixed", "one-chunk"])
def test_rotating_cache_equals_a_sliding_window(backend, chunks):
    """max_cache=W, keep=0: the outputs and weights of a layer with window=W over the whole sequence, each
    step's weights over the keys at cache.positions, and never more than W keys in a step."""
    W, T = 4, 13
    x = normal((2, T, E), 1)
    got, steps = _decode(_layer(backend), x, _layer(backend).init_cache(2, max_cache=W), chunks)
    want, P = (mha.to_numpy(a) for a in _layer(backend, window=W)(x, causal=True, return_weights=True))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    t = 0
    for n, (w, pos) in zip(chunks, steps):
        np.testing.assert_allclose(w, P[:, :, t:t + n, pos], rtol=0, atol=2e-6)
        assert n > 1 or w.shape[-1] <= W
        t += n
    assert steps[-1][1][-1] == T - 1


@pytest.mark.parametrize("chunks", [[1] * 14, [6, 1, 4, 1, 2], [3, 11]], ids=["steps", "mixed", "chunks"])
@pytest.mark.parametrize("keep", [1, 3])
def test_first_positions_are_never_evicted(chunks, keep):
    """max_cache=M with keep=k equals the full causal layer under the mask of the rule (sinks and the
    latest M - k); the sinks lead cache.positions, and a step attends at most M keys. The guard: without
    the sinks (keep=0) the outputs differ."""
    M, T = 6, 14
    x = normal((1, T, E), 2)
    got, steps = _decode(_layer(), x, _layer().init_cache(1, max_cache=M, keep=keep), chunks)
    want = mha.to_numpy(_layer()(x, mask=_rule(T, M, keep)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    for n, (w, pos) in zip(chunks, steps):
        assert list(pos[:keep]) == list(range(min(keep, len(pos)))) and (n > 1 or w.shape[-1] <= M)
        assert np.all(np.diff(pos) > 0)
    without, _ = _decode(_layer(), x, _layer().init_cache(1, max_cache=M), chunks)
    assert np.abs(without - got)[:, M:].max() > 1e-3


def test_rotating_cache_with_a_window_rope_and_padding():
    """A layer window narrower than the cache, RoPE at absolute positions, left padding: as the full layer
    with the rule's mask AND the window AND the padding."""
    M, keep, W, T = 7, 2, 4, 12
    layer = _layer(rope=mha.RoPE(dims=4), window=W)
    x = normal((2, T, E), 5)
    km = np.ones((2, T), bool)
    km[1, :3] = False
    cache = layer.init_cache(2, max_cache=M, keep=keep)
    outs = [mha.to_numpy(layer(x[:, :5], cache=cache, causal=True, key_mask=km[:, :5]))]
    for t in range(5, T):
        outs.append(mha.to_numpy(layer(x[:, t:t + 1], cache=cache, causal=True)))
    want = mha.to_numpy(layer(x, mask=_rule(T, M, keep), key_mask=km, causal=True))
    np.testing.assert_allclose(np.concatenate(outs, 1)[0], want[0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.concatenate(outs, 1)[1, 3:], want[1, 3:], rtol=0, atol=2e-5)


def test_buffers_grow_geometrically_or_stay_bounded():
    """An unbounded cache doubles its buffers (a handful of reallocations for 3000 tokens); a rotating
    cache keeps a buffer of about 2 M whatever the length, and so does a window's."""
    layer = mha.MultiHeadAttention(8, 2, backend="numpy", seed=0)
    x = normal((1, 1, 8), 0)
    caps = {"unbounded": [], "rotating": [], "window": []}
    caches = {"unbounded": layer.init_cache(1), "rotating": layer.init_cache(1, max_cache=50, keep=4)}
    wlayer = mha.MultiHeadAttention(8, 2, backend="numpy", seed=0, window=30)
    caches["window"] = wlayer.init_cache(1)
    for _ in range(3000):
        for name, c in caches.items():
            (wlayer if name == "window" else layer)(x, cache=c, causal=True)
            caps[name].append(c.capacity)
    assert len(set(caps["unbounded"])) <= 5 and caps["unbounded"][-1] >= 3000
    assert max(caps["rotating"]) <= 2 * 51 and max(caps["window"]) <= 2 * 30
    assert caches["rotating"].kept == 50 and list(caches["rotating"].positions[:4]) == [0, 1, 2, 3]


def test_bad_cache_arguments():
    layer = _layer()
    with pytest.raises(ValueError, match="keep=2 needs a rotating cache larger than it"):
        layer.init_cache(1, keep=2)
    with pytest.raises(ValueError, match="max_cache > keep"):
        layer.init_cache(1, max_cache=3, keep=3)
    with pytest.raises(TypeError, match="max_cache must be a positive int"):
        layer.init_cache(1, max_cache=2.5)
    with pytest.raises(TypeError, match="keep must be a positive int"):
        layer.init_cache(1, max_cache=4, keep="1")
