"""The public surface: names, signatures shared by the backends, backend selection, dispatch."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import mha
import mha._backends as backends
import mha_cpu

from tests.helpers import normal


def test_public_names():
    for name in ("MultiHeadAttention", "AttentionWeights", "available_backends", "default_backend",
                 "to_numpy", "MaskSet", "vjp", "KVCache"):
        assert name in mha.__all__ and hasattr(mha, name)
    assert mha_cpu.__all__ == ["MultiHeadAttention", "Options", "attend", "options", "small_blocks"]


def test_backends_share_constructor_call_and_public_names():
    mha_mlx = pytest.importorskip("mha_mlx")
    cpu, gpu = mha_cpu.MultiHeadAttention, mha_mlx.MultiHeadAttention
    assert inspect.signature(cpu.__init__) == inspect.signature(gpu.__init__)
    assert inspect.signature(cpu.__call__) == inspect.signature(gpu.__call__)
    public = {n for n in dir(cpu) if not n.startswith("_")}
    mlx_public = {n for n in dir(gpu) if not n.startswith("_")}
    import mlx.nn as nn

    assert public <= mlx_public
    assert mlx_public - public <= {n for n in dir(nn.Module) if not n.startswith("_")} | {
        "q_proj", "k_proj", "v_proj", "out_proj"}


def test_facade_signature_is_the_backends():
    """One signature: the facade's and each backend's class (help() and type checkers see the call)."""
    facade = inspect.signature(mha.MultiHeadAttention)
    assert facade == inspect.signature(mha_cpu.MultiHeadAttention)
    names = list(facade.parameters)
    assert names == ["embed_dim", "num_heads", "num_kv_heads", "kdim", "vdim", "bias", "scale", "dropout",
                     "backend", "dtype", "weights", "seed", "head_dim", "rope", "window", "softcap", "qk_norm",
                     "sinks"]
    call = inspect.signature(mha.MultiHeadAttention.__call__).parameters
    assert list(call)[:12] == ["self", "query", "key", "value", "mask", "key_mask", "causal", "head_mask",
                               "return_weights", "training", "check_finite", "return_lse"]
    for name in ("__call__", "to", "weights", "init_cache", "from_weights", "set_weights"):
        assert name in mha.MultiHeadAttention.__dict__, name
    assert issubclass(mha_cpu.MultiHeadAttention, mha.MultiHeadAttention)


def test_backend_classes_build_from_weights_and_refuse_another_backend(backend):
    cls = mha.MultiHeadAttention.from_weights(mha.AttentionWeights.init(12, 4, seed=0), backend=backend).__class__
    layer = cls.from_weights(mha.AttentionWeights.init(12, 4, seed=1))
    assert type(layer) is cls and layer.backend == backend
    other = "mlx" if backend == "numpy" else "numpy"
    with pytest.raises(ValueError, match=rf"is the {backend} backend, got backend='{other}'"):
        cls(12, 4, backend=other)


def test_facade_builds_backend_layers(backend):
    layer = mha.MultiHeadAttention(12, 4, backend=backend)
    assert isinstance(layer, mha.MultiHeadAttention)
    assert layer.backend == backend
    assert type(layer).__module__.startswith("mha_cpu" if backend == "numpy" else "mha_mlx")
    assert "backend=" in repr(layer) and "embed_dim=12" in repr(layer)
    assert (layer.embed_dim, layer.num_heads, layer.head_dim, layer.num_kv_heads) == (12, 4, 3, 4)
    assert layer.scale == pytest.approx(1 / np.sqrt(3))
    out = layer(normal((2, 3, 12), 0))
    assert isinstance(out, np.ndarray) == (backend == "numpy")


def test_auto_picks_numpy_without_gpu_and_env_overrides(monkeypatch):
    monkeypatch.delenv("MHA_BACKEND", raising=False)
    if not backends.mlx_on_gpu():
        assert mha.default_backend() == "numpy"
        assert mha.MultiHeadAttention(8, 2).backend == "numpy"
    monkeypatch.setenv("MHA_BACKEND", "numpy")
    assert mha.default_backend() == "numpy"
    monkeypatch.setenv("MHA_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"\$MHA_BACKEND must be one of 'auto', 'numpy', 'mlx', got 'tpu'"):
        mha.default_backend()


def test_auto_picks_mlx_on_a_gpu(monkeypatch):
    monkeypatch.delenv("MHA_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_mlx_status", lambda: (True, True, "gpu"))
    assert mha.default_backend() == "mlx"


def test_missing_mlx_names_the_install_command(monkeypatch):
    monkeypatch.setattr(backends, "_mlx_status", lambda: (False, False, "not installed"))
    assert mha.available_backends() == ("numpy",)
    with pytest.raises(ValueError, match=r"backend='mlx' needs MLX, which is not installed: pip install "
                                         r"'mha-twin\[mlx\]'"):
        mha.MultiHeadAttention(8, 2, backend="mlx")


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'numpy', 'mlx', got 'cuda'"):
        mha.MultiHeadAttention(8, 2, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a str, got 3"):
        mha.MultiHeadAttention(8, 2, backend=3)


def test_to_numpy_accepts_every_array_kind():
    assert mha.to_numpy([1.0, 2.0]).tolist() == [1.0, 2.0]
    a = np.ones(3, np.float32)
    assert mha.to_numpy(a) is a
    mx = pytest.importorskip("mlx.core")
    np.testing.assert_array_equal(mha.to_numpy(mx.array([1.5, 2.5], dtype=mx.bfloat16)), [1.5, 2.5])
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(mha.to_numpy(torch.tensor([1.0, 2.0], dtype=torch.bfloat16)), [1.0, 2.0])


def test_inputs_of_any_array_kind(backend):
    layer = mha.MultiHeadAttention(6, 2, seed=0, backend=backend)
    x = normal((2, 3, 6), 1)
    ref = mha.to_numpy(layer(x))
    np.testing.assert_allclose(mha.to_numpy(layer(x.tolist())), ref, rtol=1e-6)
    np.testing.assert_allclose(mha.to_numpy(layer(x.astype(np.float64))), ref, rtol=1e-6)
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(mha.to_numpy(layer(torch.from_numpy(x))), ref, rtol=1e-6)
    mx = pytest.importorskip("mlx.core")
    np.testing.assert_allclose(mha.to_numpy(layer(mx.array(x))), ref, rtol=1e-6)


def test_dropout_is_seeded_reproducible_and_only_in_training(backend):
    a = mha.MultiHeadAttention(12, 4, dropout=0.4, seed=5, backend=backend)
    b = mha.MultiHeadAttention(12, 4, dropout=0.4, seed=5, backend=backend)
    x = normal((2, 7, 12), 1)
    ya1, Pa1 = (mha.to_numpy(t) for t in a(x, training=True, return_weights=True))
    yb1, Pb1 = (mha.to_numpy(t) for t in b(x, training=True, return_weights=True))
    np.testing.assert_array_equal(ya1, yb1)
    ya2 = mha.to_numpy(a(x, training=True))
    assert not np.array_equal(ya1, ya2)  # a fresh mask on every call
    y_eval, P_eval = (mha.to_numpy(t) for t in a(x, return_weights=True))
    np.testing.assert_allclose(mha.to_numpy(a(x)), y_eval, atol=1e-6)  # no dropout when not training
    dropped = Pa1 == 0
    assert 0.25 < dropped.mean() < 0.55
    np.testing.assert_allclose(Pa1[~dropped], P_eval[~dropped] / 0.6, rtol=1e-5)  # inverted dropout
