"""MLX gradients in float16 and bfloat16 at the lengths people train with (128 to 4096): finite, and each
within 4x the error of torch autograd in the same dtype, both against a float32 reference (FlashAttention's
rule). Padding and a query that sees no key included. 128 and 512 run by default, longer ones are slow."""

from __future__ import annotations

import numpy as np
import pytest

import mha

from tests.helpers import normal, random_weights
from tests.training.torch_reference import mha_vjp

pytest.importorskip("torch")
pytest.importorskip("mlx.core")

E, H = 32, 2


def check(T: int, dtype: str, B: int = 2):
    w = random_weights(E, H, seed=T)
    x, dy = normal((B, T, E), 1), normal((B, T, E), 2)
    km = np.ones((B, T), bool)
    km[-1, : T // 3] = False  # left padding: the first third of the last batch element's queries see no key
    kw = dict(key_mask=km, causal=True)
    _, g32 = mha_vjp(w, x, x, x, dy, dtype="float32", **kw)
    _, g_half = mha_vjp(w, x, x, x, dy, dtype=dtype, **kw)
    layer = mha.MultiHeadAttention.from_weights(w, backend="mlx", dtype=dtype)
    _, pull = mha.vjp(layer, x, x, x, **kw)
    g = pull(dy)
    ours = dict(query=g.query, key=g.key, value=g.value, **g.weights.to_dict())
    for n, ref in g32.items():
        if ref is None:
            continue
        a = np.asarray(mha.to_numpy(ours[n]), np.float64)
        assert np.isfinite(a).all(), f"{dtype} T={T}: gradient of {n} not finite"
        err, torch_err = np.abs(a - ref).max(), np.abs(g_half[n] - ref).max()
        assert err <= 4 * torch_err, f"{dtype} T={T}: gradient of {n} off by {err:.3g}, torch by {torch_err:.3g}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("T", [128, 512])
def test_half_precision_gradients(T, dtype):
    check(T, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("T", [1024, 2048, 4096])
def test_half_precision_gradients_long(T, dtype):
    check(T, dtype, B=1)
