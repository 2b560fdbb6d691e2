"""mha.vjp on both backends against torch autograd: every feature of the forward, float32 within 4x torch's
own float32 error (FlashAttention's rule), float64 within 1e-9, numpy and MLX equal to each other."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import mha
from mha.testing import oracle
from mha.testing.gradients import magnitudes

from tests.helpers import normal, random_bool, random_weights
from tests.training.torch_reference import mha_vjp

pytest.importorskip("torch")

B, T, S, E, H = 2, 13, 17, 24, 4
FEATURES = ["plain", "bool_mask", "additive_mask", "key_mask", "causal", "window", "empty_rows", "gqa", "mqa",
            "cross_kdim", "head_mask", "rope", "dropout", "all", "combined",  # combined: all but dropout
            "softcap", "qk_norm", "sinks"]  # the layer features of core-cpu's M2
LAYER_OPTIONS = set(inspect.signature(mha.MultiHeadAttention.__init__).parameters)
U32 = 2.0**-24


def case(feature: str, seed: int):
    """(weights, query, key, value, d_out, call kwargs, layer kwargs) exercising ``feature``."""
    if feature == "combined":
        w, x, k, v, dy, kw, layer = case("all", seed)
        kw.pop("training"), layer.pop("dropout")
        return w, x, k, v, dy, kw, layer
    Hkv = {"gqa": 2, "mqa": 1, "all": 2}.get(feature, H)
    kdim, vdim = (11, 7) if feature in ("cross_kdim", "all") else (E, E)
    w = random_weights(E, H, Hkv=Hkv, kdim=kdim, vdim=vdim, seed=seed)
    x, k, v = normal((B, T, E), seed + 1), normal((B, S, kdim), seed + 2), normal((B, S, vdim), seed + 3)
    dy = normal((B, T, E), seed + 4)
    kw, layer = {}, {}
    if feature in ("bool_mask", "all"):
        kw["mask"] = random_bool((B, 1, T, S), seed)
    if feature == "additive_mask":
        m = normal((1, H, T, S), seed, sigma=2.0)
        m[random_bool(m.shape, seed + 9, p=0.2)] = -np.inf
        kw["mask"] = m
    if feature in ("key_mask", "all"):
        km = random_bool((B, S), seed + 5, p=0.8)
        if feature == "key_mask":
            km[1] = False  # a batch element that is all padding
        kw["key_mask"] = km
    if feature in ("causal", "all"):
        kw["causal"] = True
    if feature == "empty_rows":
        m = random_bool((B, 1, T, S), seed)
        m[0, 0, 3] = m[1, 0, 7] = False
        kw["mask"] = m
    if feature in ("head_mask", "all"):
        kw["head_mask"] = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    if feature in ("rope", "all"):
        layer["rope"] = mha.RoPE(base=100.0, traditional=feature == "all")
    if feature in ("window", "all"):
        layer["window"] = 5
    if feature in ("dropout", "all"):
        layer["dropout"] = 0.3
        kw["training"] = True
    if feature in ("softcap", "qk_norm", "sinks"):
        kw["causal"] = True
        if feature not in LAYER_OPTIONS:
            pytest.skip(f"the layer has no {feature} option yet (core-cpu M2)")
        rng = np.random.default_rng(seed + 7)
        if feature == "softcap":
            layer["softcap"] = 1.5  # logits here reach ~5: the cap bends them
        extra = {}
        if feature == "qk_norm":
            layer["qk_norm"] = 1e-6
            extra = dict(q_norm=rng.uniform(0.5, 2.0, E // H).astype(np.float32),
                         k_norm=rng.uniform(0.5, 2.0, E // H).astype(np.float32))
        if feature == "sinks":
            extra = dict(sinks=rng.normal(size=H).astype(np.float32))
        d = {n: a for n, a in w.to_dict().items() if n not in extra}
        w = mha.AttentionWeights(**d, **extra, num_heads=H, num_kv_heads=w.num_kv_heads)
    return w, x, k, v, dy, kw, layer


def run(backend, feature, seed, dtype="float32"):
    """(ours, torch float64, torch in ``dtype``... ) gradients and outputs for one case."""
    w, x, k, v, dy, kw, lk = case(feature, seed)
    try:
        layer = mha.MultiHeadAttention.from_weights(w, backend=backend, seed=seed, dtype=dtype, **lk)
    except ValueError as err:
        if feature in ("softcap", "qk_norm", "sinks") and feature in str(err):
            pytest.skip(f"{backend}: {err}")
        raise
    drop = None
    if "dropout" in lk:  # the multiplier the layer draws: a twin of the same seed draws the same
        twin = mha.MultiHeadAttention.from_weights(w, backend=backend, seed=seed, dtype=dtype, **lk)
        drop = mha.to_numpy(twin._dropout_multiplier((B, H, T, S), lk["dropout"], twin._dtypes()[1]))
    cast = (lambda a: a.astype(np.float64)) if dtype == "float64" else (lambda a: a)
    out, pull = mha.vjp(layer, cast(x), cast(k), cast(v), **kw)
    g = pull(cast(dy))
    ours = dict(query=g.query, key=g.key, value=g.value, **g.weights.to_dict())
    ours = {n: None if a is None else mha.to_numpy(a).astype(np.float64) for n, a in ours.items()}
    tkw = {n: a for n, a in kw.items() if n != "training"}
    tkw.update({n: a for n, a in lk.items() if n in ("rope", "window", "softcap", "qk_norm")})
    y64, g64 = mha_vjp(w, x, k, v, dy, dropout=drop, **tkw)
    return mha.to_numpy(out).astype(np.float64), ours, y64, g64, (w, x, k, v, dy, tkw, drop)


def torch_tolerances(args, g64):
    """4x torch's own float32 error against float64, per gradient, plus one unit of roundoff at its scale."""
    w, x, k, v, dy, tkw, drop = args
    _, g32 = mha_vjp(w, x, k, v, dy, dropout=drop, dtype="float32", **tkw)
    return {n: 4 * np.abs(g32[n] - a).max() + U32 * np.abs(a).max() for n, a in g64.items() if a is not None}


def within(ours, g64, tol, what):
    for n, ref in g64.items():
        if ref is None:
            assert ours[n] is None, (what, n)
            continue
        err = np.abs(ours[n] - ref).max()
        assert err <= tol[n], f"{what}: gradient of {n} off by {err:.3g} > {tol[n]:.3g} (|g| {np.abs(ref).max():.3g})"


@pytest.mark.parametrize("feature", FEATURES)
def test_float32_within_4x_torch_error(backend, feature):
    """Each gradient within 4 x torch's own float32 error (autograd over the math) of float64 torch."""
    for seed in (0, 10):
        out, ours, y64, g64, args = run(backend, feature, seed)
        assert np.abs(out - y64).max() < 1e-4 * np.abs(y64).max()
        within(ours, g64, torch_tolerances(args, g64), f"{backend} {feature} seed {seed}")


@pytest.mark.parametrize("feature", FEATURES)
def test_float64_within_1e9(feature):
    """numpy in float64: each gradient within 1e-9 of torch float64, relative to its magnitude M
    (mha.testing.gradients.magnitudes: the exact gradient may be 0, as the key bias's is)."""
    out, ours, y64, g64, (w, x, k, v, dy, tkw, drop) = run("numpy", feature, 3, dtype="float64")
    _, P = oracle.attention(w, x, k, v, **{n: a for n, a in tkw.items()})
    M = magnitudes(w, x, k, v, dy, P, mask=tkw.get("mask"), head_mask=tkw.get("head_mask"), dropout=drop,
                   qk_norm=tkw.get("qk_norm"))
    within(ours, g64, {n: 1e-9 * max(np.abs(a).max(), M[n] * 1e-3) for n, a in g64.items() if a is not None},
           f"float64 {feature}")


@pytest.mark.parametrize("feature", ["combined", "mqa", "empty_rows", "additive_mask"])
def test_numpy_and_mlx_agree(feature):
    """The two backends' gradients agree within the sum of their bounds (each 4x torch's error). (With
    dropout they draw different kept weights; each backend is held to torch with its own draw above.)"""
    pytest.importorskip("mlx.core")
    _, g_np, _, g64, args = run("numpy", feature, 20)
    _, g_mx, _, _, _ = run("mlx", feature, 20)
    tol = torch_tolerances(args, g64)
    within(g_np, {n: g_mx[n] for n in g64}, {n: 2 * t for n, t in tol.items()}, f"numpy vs mlx {feature}")


def test_guard_a_gradient_that_ignores_a_feature_fails():
    """The bound is tight enough to see a feature switched off: RoPE's and the window's gradients differ
    from the plain layer's by far more than the tolerance."""
    for feature, off in (("rope", {"rope"}), ("window", {"window"})):
        _, _, _, g64, args = run("numpy", feature, 0)
        w, x, k, v, dy, tkw, drop = args
        _, plain = mha_vjp(w, x, k, v, dy, **{n: a for n, a in tkw.items() if n not in off})
        tol = torch_tolerances(args, g64)
        assert max(np.abs(plain[n] - g64[n]).max() / tol[n] for n in ("q_weight", "query")) > 100


def test_self_attention_gradient_is_the_sum_of_the_three_roles(backend):
    """With key and value omitted, g.query is the gradient of the one input (the sum of its three roles),
    and g.key, g.value are None; given separately, each argument gets its own role's."""
    w = random_weights(E, H, Hkv=2, seed=4)
    x, dy = normal((B, T, E), 5), normal((B, T, E), 6)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    _, pull = mha.vjp(layer, x, causal=True)
    g = pull(dy)
    assert g.key is None and g.value is None
    _, ref = mha_vjp(w, x, x, x, dy, causal=True)
    total = ref["query"] + ref["key"] + ref["value"]
    assert np.abs(mha.to_numpy(g.query) - total).max() < 1e-4 * np.abs(total).max()
    _, pull3 = mha.vjp(layer, x, x, x, causal=True)
    g3 = pull3(dy)
    for n in ("query", "key", "value"):
        assert np.abs(mha.to_numpy(getattr(g3, n)) - ref[n]).max() < 1e-4 * np.abs(ref[n]).max(), n
    _, pull2 = mha.vjp(layer, x, x, causal=True)  # key given, value omitted: g.key holds both roles
    g2 = pull2(dy)
    assert g2.value is None
    assert np.abs(mha.to_numpy(g2.key) - ref["key"] - ref["value"]).max() < 1e-4 * np.abs(total).max()


def test_unbatched_inputs_give_unbatched_gradients(backend):
    w = random_weights(E, H, kdim=7, vdim=5, seed=1)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    x, k, v = normal((T, E), 1), normal((S, 7), 2), normal((S, 5), 3)
    out, pull = mha.vjp(layer, x, k, v, key_mask=np.arange(S) < 9)
    assert out.shape == (T, E)
    g = pull(normal((T, E), 4))
    assert g.query.shape == (T, E) and g.key.shape == (S, 7) and g.value.shape == (S, 5)
    _, ref = mha_vjp(w, x[None], k[None], v[None], normal((T, E), 4)[None], key_mask=(np.arange(S) < 9)[None])
    assert np.abs(mha.to_numpy(g.key) - ref["key"][0]).max() < 1e-4 * np.abs(ref["key"]).max()


@pytest.mark.parametrize("feature", ["dropout", "all", "combined", "window"])
def test_numpy_blockwise_backward_within_4x_torch_error(feature):
    """The numpy backward on tiny blocks and a pool (mha_cpu.small_blocks): every block of rows and keys
    cuts the masks and the dropout multiplier (broadcast axes kept) to its own rows and columns; each
    gradient within 4 x torch's own float32 error, as on whole blocks."""
    import mha_cpu

    with mha_cpu.small_blocks(4, 5):
        for seed in (0, 10):
            out, ours, y64, g64, args = run("numpy", feature, seed)
            assert np.abs(out - y64).max() < 1e-4 * np.abs(y64).max()
            within(ours, g64, torch_tolerances(args, g64), f"numpy small blocks {feature} seed {seed}")
