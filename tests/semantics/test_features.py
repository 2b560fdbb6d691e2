"""Layer features softcap=, qk_norm=, sinks=: against the float64 oracle with the guard that each matters,
their weights through init, files, pruning and backends, and their checks."""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.testing import oracle, tolerance

from tests.helpers import normal, random_weights

E, H, Hkv = 24, 6, 2
FEATURES = {"softcap": dict(softcap=0.8), "qk_norm": dict(qk_norm=1e-5), "sinks": dict(sinks=True),
            "all": dict(softcap=2.0, qk_norm=1e-6, sinks=True)}


def _weights(feature_kw, seed=3):
    w = random_weights(E, H, Hkv=Hkv, seed=seed)
    rng = np.random.default_rng(seed)
    extra = {}
    if "qk_norm" in feature_kw:
        extra.update(q_norm=rng.uniform(0.3, 3, w.head_dim), k_norm=rng.uniform(0.3, 3, w.head_dim))
    if feature_kw.get("sinks"):
        extra["sinks"] = rng.normal(0.5, 1.5, H)
    return mha.AttentionWeights(**w.to_dict(), **extra, num_heads=H, num_kv_heads=Hkv)


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_features_equal_the_oracle_and_matter(name, dtype):
    """Output and weights against the float64 oracle (padding, causal, cross-attention lengths); the
    oracle with the feature switched off differs by far more than the tolerance."""
    kw = FEATURES[name]
    w = _weights(kw)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy", dtype=dtype, softcap=kw.get("softcap"),
                                                qk_norm=kw.get("qk_norm"))
    x = normal((2, 7, E), 1, sigma=2.0).astype(dtype)
    km = np.ones((2, 7), bool)
    km[1, :2] = False
    y, P = layer(x, key_mask=km, causal=True, return_weights=True)
    want, P_want = oracle.attention(w, x, key_mask=km, causal=True, softcap=kw.get("softcap"), qk_norm=kw.get("qk_norm"))
    M = tolerance.magnitude(w, x, y_ref=want)
    tolerance.assert_close(y, want, tolerance.t1(dtype, M), name)
    tolerance.assert_close(P, P_want, tolerance.t1(dtype, M), f"{name} weights")
    plain = mha.AttentionWeights(**{k: v for k, v in w.to_dict().items() if k not in ("q_norm", "k_norm", "sinks")},
                                 num_heads=H, num_kv_heads=Hkv)
    off, _ = oracle.attention(plain, x, key_mask=km, causal=True)
    assert np.abs(off - want).max() > 100 * tolerance.t1(dtype, M)
    if kw.get("sinks"):
        assert np.all(P.sum(-1)[P.sum(-1) > 0] < 1)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_feature_weights_save_load_prune_and_move(tmp_path, suffix):
    """q_norm, k_norm and sinks survive a file; pruning takes each surviving head's sink (the pruned layer
    equals the original with those heads masked); .to() carries them, to the MLX backend too."""
    kw = FEATURES["all"]
    w = _weights(kw)
    path = tmp_path / f"w{suffix}"
    w.save(path)
    back = mha.AttentionWeights.load(path)
    assert back == w and back.qk_norm and back.sinks.shape == (H,)
    layer = mha.MultiHeadAttention.from_weights(back, backend="numpy", **{k: kw[k] for k in ("softcap", "qk_norm")})
    x = normal((2, 5, E), 2)
    pruned = mha.prune_heads(layer, [1, 4])
    np.testing.assert_array_equal(pruned.weights.sinks, w.sinks[[0, 2, 3, 5]])
    hm = np.ones(H, np.float32)
    hm[[1, 4]] = 0
    np.testing.assert_allclose(pruned(x, causal=True), layer(x, causal=True, head_mask=hm), rtol=0, atol=1e-5)
    again = layer.to("numpy", dtype="float64")
    assert again.config.softcap == 2.0 and again.weights.q_norm is not None
    pytest.importorskip("mlx.core")
    on_mlx = layer.to("mlx")
    assert on_mlx.weights == w and on_mlx.config.softcap == 2.0
    np.testing.assert_allclose(mha.to_numpy(on_mlx(x, causal=True)), layer(x, causal=True), rtol=0, atol=1e-5)


def test_feature_checks():
    w = random_weights(E, H, Hkv=Hkv)
    for kwargs, err, words in [
        (dict(softcap=0.0), ValueError, "softcap must be a positive float"),
        (dict(softcap="1"), TypeError, "softcap must be a finite float"),
        (dict(qk_norm=-1e-6), ValueError, "qk_norm must be a positive float"),
        (dict(sinks=1), TypeError, "sinks must be True or False"),
    ]:
        with pytest.raises(err, match=words):
            mha.MultiHeadAttention(E, H, backend="numpy", **kwargs)
    with pytest.raises(ValueError, match="qk_norm weights: layer True, weights False"):
        mha.MultiHeadAttention(E, H, num_kv_heads=Hkv, backend="numpy", weights=w, qk_norm=1e-6)
    with pytest.raises(ValueError, match="q_norm and k_norm must be given together"):
        mha.AttentionWeights(**w.to_dict(), q_norm=np.ones(4), num_heads=H, num_kv_heads=Hkv)
    with pytest.raises(ValueError, match=r"sinks: expected \(6,\), got \(2,\)"):
        mha.AttentionWeights(**w.to_dict(), sinks=np.zeros(2), num_heads=H, num_kv_heads=Hkv)
    layer = mha.MultiHeadAttention(E, H, backend="numpy", qk_norm=1e-6, sinks=True, seed=0)
    assert np.array_equal(layer.weights.q_norm, np.ones(4)) and np.array_equal(layer.weights.sinks, np.zeros(H))
    with pytest.raises(ValueError, match="qk_norm"):
        oracle.attention(layer.weights, normal((1, 3, E), 0))
