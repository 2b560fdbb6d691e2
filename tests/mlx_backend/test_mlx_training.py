"""mha_mlx.MultiHeadAttention is a trainable mlx.nn.Module: gradients are finite and correct."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import mha
from mha.testing import oracle

from tests.helpers import normal, random_bool, random_weights

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
optim = pytest.importorskip("mlx.optimizers")
from mlx.utils import tree_flatten  # noqa: E402

B, T, S, E, H = 2, 4, 5, 12, 4


def _masks():
    m = random_bool((B, 1, T, S), 1)
    m[0, 0, 2] = False  # an empty row: its gradient must be finite (zero), not NaN
    km = np.ones((B, S), bool)
    km[1, -2:] = False
    return dict(mask=m, key_mask=km, causal=True)


@pytest.mark.parametrize("path", ["fused", "weights"])
def test_grad_matches_float64_finite_differences(path):
    w = random_weights(E, H, Hkv=2, seed=3)
    layer = mha.MultiHeadAttention.from_weights(w, backend="mlx")
    x, kv = normal((B, T, E), 4), normal((B, S, E), 5)
    r = normal((B, T, E), 6)
    masks = _masks()

    def loss_fn(model, x, kv):
        out = model(x, kv, return_weights=path == "weights", **masks)
        out = out[0] if isinstance(out, tuple) else out
        return (out * mx.array(r)).sum()

    loss, grads = nn.value_and_grad(layer, loss_fn)(layer, mx.array(x), mx.array(kv))
    flat = dict(tree_flatten(grads))
    for g in flat.values():
        assert bool(mx.all(mx.isfinite(g)))

    def f64_loss(weights):
        y, _ = oracle.attention(weights, x, kv, **masks)
        return float((y * r).sum())

    rng = np.random.default_rng(0)
    names = {"q_weight": "q_proj.weight", "k_weight": "k_proj.weight", "v_weight": "v_proj.weight",
             "o_weight": "out_proj.weight", "k_bias": "k_proj.bias", "o_bias": "out_proj.bias"}
    h = 1e-6
    for ours, theirs in names.items():
        g = np.array(flat[theirs])
        for _ in range(3):
            idx = tuple(int(rng.integers(n)) for n in g.shape)
            d = w.to_dict()
            plus = {k: (None if v is None else v.astype(np.float64)) for k, v in d.items()}
            minus = {k: (None if v is None else v.copy()) for k, v in plus.items()}
            plus[ours][idx] += h
            minus[ours][idx] -= h
            wp = mha.AttentionWeights(**plus, num_heads=H, num_kv_heads=2)
            wm = mha.AttentionWeights(**minus, num_heads=H, num_kv_heads=2)
            fd = (f64_loss(wp) - f64_loss(wm)) / (2 * h)
            # float32 gradient vs float64 derivative: both O(1); 1e-3 relative to the gradient scale
            assert abs(g[idx] - fd) <= 1e-3 * max(1.0, np.abs(g).max()), (theirs, idx, g[idx], fd)
    assert np.isfinite(float(loss))


def test_k_bias_gradient_is_zero():
    """Adding a constant to every logit of a row changes nothing, so the key bias gets no gradient."""
    layer = mha.MultiHeadAttention.from_weights(random_weights(E, H, seed=1), backend="mlx")
    x = mx.array(normal((B, T, E), 2))

    def loss_fn(model, x):
        return (model(x) ** 2).sum()

    _, grads = nn.value_and_grad(layer, loss_fn)(layer, x)
    assert float(mx.abs(grads["k_proj"]["bias"]).max()) < 1e-5


def test_trains_with_mlx_optimizers():
    """A few Adam steps fit a target produced by another layer: the loss falls by an order of magnitude."""
    teacher = mha.MultiHeadAttention(E, H, seed=1, backend="mlx")
    student = mha.MultiHeadAttention(E, H, seed=2, backend="mlx")
    x = mx.array(normal((8, T, E), 3))
    target = teacher(x, causal=True)
    opt = optim.Adam(learning_rate=3e-2)

    def loss_fn(model):
        return ((model(x, causal=True) - target) ** 2).mean()

    step = nn.value_and_grad(student, loss_fn)
    first = None
    for _ in range(60):
        loss, grads = step(student)
        opt.update(student, grads)
        mx.eval(student.parameters(), opt.state)
        first = float(loss) if first is None else first
    assert float(loss_fn(student)) < 0.1 * first
    assert len(student.trainable_parameters()) == 4  # q/k/v/out projections; the dropout key is not a parameter


def test_many_layers_then_grad_does_not_crash():
    """Regression: building layers used to leave MLX's global random key a long lazy chain (nn.Linear's
    unevaluated random init); a later mx.grad recursed through it and overflowed the stack. Run in a
    subprocess, so that a regression fails this test instead of killing the test run."""
    code = (
        "import mlx.core as mx, mlx.nn as nn, mha\n"
        "for i in range(20000): mha.MultiHeadAttention(4, 2, backend='mlx', seed=i)\n"
        "layer = mha.MultiHeadAttention(8, 2, backend='mlx', seed=0)\n"
        "x = mx.random.normal((2, 3, 8))\n"
        "loss, _ = nn.value_and_grad(layer, lambda m: (m(x, causal=True) ** 2).mean())(layer)\n"
        "print(float(loss))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
