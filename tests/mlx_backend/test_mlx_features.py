"""The layer features softcap=, qk_norm=, sinks= on the MLX backend: every path of its core against the
float64 oracle (the fused kernel, blockwise in tiny blocks, with weights, with lse, a decode step into a
rotating cache with kept first tokens), each feature shown to matter, and trainable: mx.grad of a loss
equals float64 finite differences for the features' own parameters."""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.testing import oracle, tolerance
from tests.helpers import normal
from tests.semantics.test_features import FEATURES, E, H, Hkv, _weights

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
import mha_mlx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

PATHS = ["auto", "tiny blocks", "weights", "lse"]


def _layer(kw, w):
    return mha.MultiHeadAttention.from_weights(w, backend="mlx", softcap=kw.get("softcap"), qk_norm=kw.get("qk_norm"))


def _call(layer, path, x, **masks):
    if path == "tiny blocks":
        with mha_mlx.small_blocks(2, 3):
            return mha.to_numpy(layer(x, **masks)), None, None
    if path == "weights":
        y, P = layer(x, **masks, return_weights=True)
        return mha.to_numpy(y), mha.to_numpy(P), None
    if path == "lse":
        y, lse = layer(x, **masks, return_lse=True)
        return mha.to_numpy(y), None, mha.to_numpy(lse)
    return mha.to_numpy(layer(x, **masks)), None, None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", FEATURES)
def test_features_equal_the_oracle_on_every_path(name, path):
    kw = FEATURES[name]
    w = _weights(kw)
    x = normal((2, 7, E), 1, sigma=2.0)
    km = np.ones((2, 7), bool)
    km[1, :2] = False
    masks = dict(key_mask=km, causal=True)
    y, P, lse = _call(_layer(kw, w), path, x, **masks)
    want, P_want = oracle.attention(w, x, **masks, softcap=kw.get("softcap"), qk_norm=kw.get("qk_norm"))
    M = tolerance.magnitude(w, x, y_ref=want)
    tolerance.assert_close(y, want, tolerance.t1("float32", M), f"{name}, {path}")
    if P is not None:
        tolerance.assert_close(P, P_want, tolerance.t1("float32", M), f"{name} weights")
        if kw.get("sinks"):
            assert np.all(P.sum(-1)[P.sum(-1) > 0] < 1), "a sink takes part of each row's weight"
    if lse is not None:  # exp(lse - sink) back to the share of real keys: the oracle's row sums
        share = P_want.sum(-1)
        if kw.get("sinks"):
            sinks = w.sinks[None, :, None].astype(np.float64)
            np.testing.assert_allclose(np.exp(sinks - lse), 1 - share, rtol=1e-4, atol=1e-6)
        else:
            assert np.array_equal(np.isneginf(lse), share == 0)
    plain = mha.AttentionWeights(**{k: v for k, v in w.to_dict().items() if k not in ("q_norm", "k_norm", "sinks")},
                                 num_heads=H, num_kv_heads=Hkv)
    off, _ = oracle.attention(plain, x, **masks)
    assert np.abs(off - want).max() > 100 * tolerance.t1("float32", M), "the feature must matter here"


@pytest.mark.parametrize("name", ["sinks", "all"])
def test_decoding_with_features_into_a_rotating_cache(name):
    """Prefill 5 tokens then one at a time into max_cache=6, keep=2: each step equals the oracle over the
    keys the cache keeps (the first 2 positions and the latest others), weights included."""
    kw = FEATURES[name]
    w = _weights(kw)
    layer = _layer(kw, w)
    x = normal((2, 12, E), 4, sigma=2.0)
    cache = layer.init_cache(2, max_cache=6, keep=2)
    outs = [mha.to_numpy(layer(x[:, :5], cache=cache, causal=True))]
    for t in range(5, 12):
        y, P = layer(x[:, t:t + 1], cache=cache, causal=True, return_weights=True)
        outs.append(mha.to_numpy(y))
        kept = cache.positions
        assert list(kept[:2]) == [0, 1] and len(kept) <= 6
        want, P_want = oracle.attention(w, x[:, t:t + 1], x[:, kept], softcap=kw.get("softcap"),
                                        qk_norm=kw.get("qk_norm"))
        M = tolerance.magnitude(w, x[:, t:t + 1], x[:, kept], y_ref=want)
        tolerance.assert_close(outs[-1], want, tolerance.t1("float32", M), f"step {t}")
        tolerance.assert_close(mha.to_numpy(P), P_want, tolerance.t1("float32", M), f"step {t} weights")


def test_feature_parameters_are_trained_by_mx_grad():
    """d loss / d (q_norm, k_norm, sinks) by nn.value_and_grad equals central differences of the float64
    oracle's loss (3 entries each); the parameters are in the module's trainable tree."""
    kw = FEATURES["all"]
    w = _weights(kw)
    layer = _layer(kw, w)
    x, r = normal((2, 5, E), 2), normal((2, 5, E), 3)
    names = {"q_norm", "k_norm", "sinks"}
    assert names <= {k for k, _ in tree_flatten(layer.trainable_parameters())}

    def loss_fn(model):
        return (model(mx.array(x), causal=True) * mx.array(r)).sum()

    _, grads = nn.value_and_grad(layer, loss_fn)(layer)
    flat = dict(tree_flatten(grads))

    def f64_loss(weights):
        y, _ = oracle.attention(weights, x, causal=True, softcap=kw["softcap"], qk_norm=kw["qk_norm"])
        return float((y * r).sum())

    rng = np.random.default_rng(0)
    h = 1e-3  # AttentionWeights hold float32: a smaller step drowns in their rounding
    for name in sorted(names):
        g = np.array(flat[name])
        for i in rng.choice(g.size, 3, replace=False):
            plus, minus = (w.to_dict() for _ in range(2))
            plus[name] = plus[name].astype(np.float64).copy()
            minus[name] = minus[name].astype(np.float64).copy()
            plus[name][i] += h
            minus[name][i] -= h
            fd = (f64_loss(mha.AttentionWeights(**plus, num_heads=H, num_kv_heads=Hkv))
                  - f64_loss(mha.AttentionWeights(**minus, num_heads=H, num_kv_heads=Hkv))) / (2 * h)
            assert abs(g[i] - fd) <= 1e-3 * max(1.0, np.abs(g).max()), (name, i, g[i], fd)
