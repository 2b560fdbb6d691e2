"""The MLX backend at the edges of float32 and in half-precision training (issue 29's MLX numerics).

- Finite inputs whose logits would leave float32 (queries and keys near 1e30, a scale of 3e38) give the
  float64 result, on every path (the fused kernel with each kind of mask, the blockwise path), where the
  bare kernel returns NaN (inf - inf in its softmax).
- float16 training: mx.vjp through the layer gives finite gradients equal to the float32 ones.
- MLX's own gradient test (ml-explore/mlx python/tests/test_fast_sdpa.py, ``test_sdpa_grad``), ported to
  this backend's kernel on heads and to the layer (identity projections), on small shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.testing import oracle, tolerance
from tests.helpers import normal, random_weights

mx = pytest.importorskip("mlx.core")
import mha_mlx  # noqa: E402
from mha_mlx import _core, _range  # noqa: E402

U32 = tolerance.unit_roundoff("float32")
MASKS = ["none", "causal", "key_mask", "bool", "additive"]


def _mask_kwargs(kind, B, T, S):
    rng = np.random.default_rng(3)
    if kind == "causal":
        return {"causal": True}
    if kind == "key_mask":
        km = np.ones((B, S), bool)
        km[0, 1] = False
        return {"key_mask": km}
    if kind == "bool":
        m = rng.random((B, 1, T, S)) < 0.6
        m[..., 0] = True  # every row sees a key
        return {"mask": m}
    if kind == "additive":  # -inf hides a key whatever the logits' size (finfo.min or -1e9 would not, at 1e60)
        m = rng.random((B, 1, T, S)) < 0.6
        m[..., 0] = True
        return {"mask": np.where(m, rng.normal(size=(B, 1, T, S)), -np.inf).astype(np.float32)}
    return {}


def _one_hot_case(weights, x, scale, kw):
    """The float64 result, after checking that its weights are one-hot (every visible row's largest logit
    beats the next by far more than float32 can resolve), so that float32's rounding of the logits, however
    large, cannot move a weight: the output is then within float32's rounding of values and output bias."""
    y, P = oracle.attention(weights, x, scale=scale, **kw)
    assert np.all(np.isclose(P.max(axis=-1), 1.0, rtol=0, atol=1e-12)), "the case must have one-hot weights"
    wo = float(np.abs(weights.o_weight.astype(np.float64)).sum(axis=1).max())
    _, _, vs = tolerance._abs_projections(weights, x, x, x)
    bound = 4 * U32 * (float(np.abs(y).max()) + wo * max(float(np.abs(a).max()) for a in vs))
    return y, bound


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("case", ["inputs 1e30", "inputs 1e35", "scale 3e38"])
@pytest.mark.parametrize("path", ["fused", "blockwise"])
def test_logits_past_float32_give_the_float64_result(case, kind, path):
    B, T, E, H = 2, 5, 12, 3
    w = random_weights(E, H, seed=2)
    mag, scale = {"inputs 1e30": (1e30, None), "inputs 1e35": (1e35, None), "scale 3e38": (1.0, 3e38)}[case]
    x = (normal((B, T, E), 4).astype(np.float64) * mag).astype(np.float32)
    layer = mha.MultiHeadAttention.from_weights(w, backend="mlx", scale=scale)
    kw = _mask_kwargs(kind, B, T, T)
    want, bound = _one_hot_case(w, x, layer.scale, kw)
    with mha_mlx.small_blocks(2, 3) if path == "blockwise" else _nothing():
        got = mha.to_numpy(layer(x, **kw))
    assert np.isfinite(got).all(), f"{case}, {kind}, {path}: non-finite output"
    tolerance.assert_close(got, want, bound, f"{case}, {kind}, {path}")


def test_the_bare_kernel_overflows_on_those_inputs(monkeypatch):
    """The guard: without the queries' rescaling the same call is NaN (inf - inf in the kernel's softmax)."""
    w = random_weights(12, 3, seed=2)
    x = (normal((2, 5, 12), 4).astype(np.float64) * 1e30).astype(np.float32)
    layer = mha.MultiHeadAttention.from_weights(w, backend="mlx")
    monkeypatch.setattr(_core, "scaled_queries", lambda q, top, scale: (q * scale, mx.array(0.0)))
    with mha_mlx.options.override(compile=False):  # the patched step runs op by op
        assert np.isnan(mha.to_numpy(layer(x))).all()


def test_scaled_queries_leave_ordinary_queries_exactly_as_the_kernel_scales_them():
    """e = 0 and q * scale bit for bit unless the logits could pass 2^100; past it, each row's logits are
    divided by the same power of two, and no factor leaves float32 even for inputs at float32's largest."""
    q = mx.array(normal((2, 3, 4, 8), 1))
    top = mx.array(7.5)
    qs, e = _range.scaled_queries(q, top, 0.3)
    assert float(e) == 0 and np.array_equal(np.array(qs), np.array(q * 0.3))
    big = mx.array(np.full((1, 1, 2, 8), 3e38, np.float32))
    qs, e = _range.scaled_queries(big, mx.array(3e38, mx.float32), 3e38)
    qs64 = np.array(qs, np.float64)
    assert np.isfinite(qs64).all() and float(e) > 254  # the whole factor 2^e is not a float32
    assert abs(qs64).max() * 3e38 * 8 <= 2.0**_range.LIMIT  # logits of the scaled queries: finite
    want = float(np.float32(3e38)) ** 2 * 2.0 ** -float(e)  # powers of two exact: one rounding, of q * scale
    np.testing.assert_allclose(qs64, want, rtol=U32, atol=0)


# -- half-precision training ---------------------------------------------------------------------------
def test_float16_gradients_of_the_layer_are_finite_and_right():
    """float16, T=128, E=512, 8 heads, no mask (the case of the issue: the key and value gradients were
    inf/NaN, the NaN flag's derivative summing 65536 float16 cotangents): finite, and within float16's
    rounding of the float32 layer's gradients (FlashAttention's rule: at most a few times the error of the
    same computation by another route in float16, here bounded by 2^-8 of each gradient's largest entry)."""
    B, T, E, H = 1, 128, 512, 8
    w = random_weights(E, H, seed=1)
    x, kv = normal((B, T, E), 2), normal((B, T, E), 3)
    grads = {}
    for dt in ("float16", "float32"):
        layer = mha.MultiHeadAttention.from_weights(w, backend="mlx", dtype=dt)
        args = [mx.array(a).astype(getattr(mx, dt)) for a in (x, kv, kv)]
        out, g = mx.vjp(lambda q, k, v: layer(q, k, v), args, [mx.ones((B, T, E), getattr(mx, dt))])
        grads[dt] = [np.array(a.astype(mx.float32)) for a in [out[0], *g]]
    for name, a, b in zip(("output", "d query", "d key", "d value"), grads["float16"], grads["float32"]):
        assert np.isfinite(a).all(), f"{name}: non-finite in float16"
        assert np.abs(a - b).max() <= 2.0**-8 * np.abs(b).max(), name


# -- MLX's test_sdpa_grad, ported -------------------------------------------------------------------
def _mlx_reference(q, k, v, scale, mask):
    """The slow attention of MLX's test: GQA by reshaping the queries, bool masks filled with the dtype's
    lowest number, additive masks added, causal aligned at the end, a precise softmax."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = (q * scale).reshape(B, Hkv, Hq // Hkv, T, D)
    s = q @ k[:, :, None].swapaxes(-1, -2)  # (B, Hkv, G, T, S)
    if isinstance(mask, str):
        mask = mx.arange(T)[:, None] + (S - T) >= mx.arange(S)[None]
    if mask is not None:
        mask = mask.reshape((B, Hkv, Hq // Hkv) + tuple(mask.shape[-2:])) if mask.ndim == 4 else mask
        s = mx.where(mask, s, mx.finfo(s.dtype).min) if mask.dtype == mx.bool_ else s + mask
    p = mx.softmax(s, axis=-1, precise=True)
    return (p @ v[:, :, None]).reshape(B, Hq, T, D)


def _identity_layer(Hq, Hkv, D, dtype):
    """A layer whose projections are identities: layer(q, k, v) is the attention of the head-merged inputs."""
    E, Ekv = Hq * D, Hkv * D
    eye = np.eye(E, dtype=np.float32)
    w = mha.AttentionWeights(eye, np.eye(Ekv, dtype=np.float32), np.eye(Ekv, dtype=np.float32), eye,
                             num_heads=Hq, num_kv_heads=Hkv)
    return mha.MultiHeadAttention.from_weights(w, backend="mlx", dtype=dtype)


def _merge(x):
    B, H, T, D = x.shape
    return x.swapaxes(1, 2).reshape(B, T, H * D)


def _split(x, H):
    B, T, HD = x.shape
    return x.reshape(B, T, H, HD // H).swapaxes(1, 2)


SMALL = (2, 2, 16, 8)  # B, Hkv, T, D
THEIRS = (2, 8, 128, 64)  # MLX's own sizes (with Hq = 8)
GRID = [(SMALL, Hq, m, r) for Hq in (2, 6) for m in ("none", "causal", "additive", "bool")
        for r in ("fused_attention", "layer")] + [(THEIRS, 8, m, "layer") for m in ("none", "additive")]


@pytest.mark.parametrize("sizes,Hq,mask_kind,route", GRID,
                         ids=[f"{'theirs' if s == THEIRS else 'small'}-Hq{h}-{m}-{r}" for s, h, m, r in GRID])
def test_mlx_sdpa_grad_ported(sizes, Hq, mask_kind, route):
    """MLX's test_sdpa_grad: float16 q, k, v ~ N(0, 1), masks None / causal / N(0, 1) additive / Bernoulli
    bool, the vjp with a cotangent of ones and the gradient of the sum, against the slow reference, at
    rtol = atol = 1e-2 (theirs). The grid on shapes smaller than theirs (MLX here is the CPU build), and
    their sizes through the layer for the masks that failed there (the sum of T x E float16 cotangents
    overflows only at their sizes); every bool row keeps its diagonal, since MLX's reference gives a row
    with no visible key the mean of the values where this project gives 0."""
    B, Hkv, T, D = sizes
    scale = D**-0.5
    rng = np.random.default_rng(Hq + 10 * len(mask_kind))
    q, k, v = (mx.array(rng.normal(size=(B, h, T, D))).astype(mx.float16) for h in (Hq, Hkv, Hkv))
    mask = {"none": None, "causal": "causal",
            "additive": mx.array(rng.normal(size=(B, Hq, T, T))).astype(mx.float16),
            "bool": mx.array((rng.random((B, Hq, T, T)) < 0.5) | np.eye(T, dtype=bool))}[mask_kind]
    kw = {} if mask is None else {"causal": True} if mask_kind == "causal" else {"mask": mask}

    def slow(q, k, v):
        return _mlx_reference(q, k, v, scale, mask)

    if route == "fused_attention":
        def fast(q, k, v):
            return mha_mlx.fused_attention(q, k, v, scale=scale, **kw)
    else:
        layer = _identity_layer(Hq, Hkv, D, "float16")

        def fast(q, k, v):
            return _split(layer(_merge(q), _merge(k), _merge(v), **kw), Hq)

    tol = {"rtol": 1e-2, "atol": 1e-2}
    cot = mx.ones_like(q)
    (o1,), g1 = mx.vjp(slow, [q, k, v], [cot])
    (o2,), g2 = mx.vjp(fast, [q, k, v], [cot])
    assert mx.allclose(o1, o2, **tol).item(), "output"
    for name, a, b in zip("qkv", g1, g2):
        assert mx.all(mx.isfinite(b)).item() and mx.allclose(a, b, **tol).item(), f"vjp d{name}"
    for i, name in enumerate("qkv"):
        a = mx.grad(lambda *x: slow(*x).sum(), argnums=i)(q, k, v)
        b = mx.grad(lambda *x: fast(*x).sum(), argnums=i)(q, k, v)
        assert mx.allclose(a, b, **tol).item(), f"grad d{name}"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
