"""Fuzzing the public API: random arguments of every kind. Only two outcomes are acceptable: a correct
result (checked against the float64 oracle) or a ValueError/TypeError. Anything else (IndexError, a
numpy broadcasting error, NaN from our own arithmetic, a crash) fails.

Ten times the profile's example count: 500 (dev), 1,500 (ci), 20,000 (thorough).
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mha
from mha.testing import oracle, tolerance

from tests.helpers import in_threads, normal, random_weights

FUZZ = settings(max_examples=settings.default.max_examples * 10, deadline=None)
ARGUMENTS = ("embed_dim", "num_heads", "num_kv_heads", "kdim", "vdim", "bias", "scale", "dropout", "dtype", "seed",
             "weights", "backend", "query", "key", "value", "mask", "key_mask", "head_mask", "causal",
             "return_weights", "training")


def named(err: Exception) -> None:
    """Our errors name the argument at fault; a bare numpy/MLX error leaking through does not."""
    msg = str(err)
    assert any(a in msg for a in ARGUMENTS), f"error does not name an argument: {type(err).__name__}: {msg}"

BAD_SIZES = st.one_of(st.integers(-2, 0), st.floats(-1, 9), st.just(float("nan")), st.none(), st.booleans(),
                     st.text(max_size=2), st.just(4.0))


@st.composite
def mostly(draw, good, bad, ratio=8):
    """``good`` about ratio/(ratio+1) of the time: most calls are valid, so results get checked too."""
    return draw(good if draw(st.integers(0, ratio)) < ratio else bad)


@st.composite
def arrays(draw, shape_hint):
    """Mostly well-formed arrays near ``shape_hint``, sometimes of the wrong rank, size or dtype."""
    kind = draw(mostly(st.just("ok"), st.sampled_from(["rank", "size", "dtype", "list", "scalar", "none"]), 16))
    shape = list(shape_hint)
    if kind == "rank":
        shape = shape[1:] if draw(st.booleans()) and len(shape) > 1 else [1] + shape
    if kind == "size" and shape:
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.integers(0, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.bool_, np.complex64, object]
                                 if kind == "dtype" else [np.float32]))
    if kind == "none":
        return None
    if kind == "scalar":
        return draw(st.sampled_from([1.0, "x", 3]))
    a = np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=shape)
    a = a.astype(dtype) if dtype is not object else a.astype(object)
    return a.tolist() if kind == "list" else a


@st.composite
def masks(draw, B, H, T, S):
    kind = draw(mostly(st.sampled_from(["none", "bool", "int", "float"]),
                       st.sampled_from(["bad-int", "nan", "shape", "torch", "str"]), 10))
    if kind == "none":
        return None
    shape = draw(st.sampled_from([(T, S), (B, 1, T, S), (1, H, T, S), (S,), (B, H, T, S), (H, T, S)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    m = rng.random(shape) < 0.7
    if kind == "int":
        return m.astype(np.int8)
    if kind == "float":
        return np.where(m, rng.normal(size=shape), -np.inf).astype(np.float32)
    if kind == "bad-int":
        return (m * 2).astype(np.int32)
    if kind == "nan":
        return np.full(shape, np.nan)
    if kind == "shape":
        return np.ones((T + 1, S), bool)
    if kind == "torch":
        return np.ones((B * H, T, S), bool)
    return "causal"


@pytest.mark.parametrize("backend_name", ["numpy", "mlx"])
@FUZZ
@given(data=st.data())
def test_fuzz_constructor_and_call(backend_name, data):
    if backend_name == "mlx":
        pytest.importorskip("mlx.core")
    kwargs = {}
    valid = {
        "num_kv_heads": st.sampled_from([1, 2]), "kdim": st.integers(1, 7), "vdim": st.integers(1, 7),
        "scale": st.one_of(st.floats(-2, 2), st.none()), "dropout": st.just(0.0), "bias": st.booleans(),
        "dtype": st.sampled_from(["float32", "float64", "float16", "bfloat16"]), "seed": st.integers(0, 9),
    }
    invalid = {"bias": st.integers(0, 1), "dtype": st.sampled_from(["int8", None, "f32"]),
               "dropout": st.floats(1.0, 1.5), "scale": st.just(float("inf"))}
    for name, good in valid.items():
        if data.draw(st.integers(0, 2), label=f"use {name}") == 0:
            kwargs[name] = data.draw(mostly(good, invalid.get(name, BAD_SIZES)), label=name)
    E = data.draw(mostly(st.sampled_from([4, 6, 8, 12]), BAD_SIZES), label="embed_dim")
    H = data.draw(mostly(st.sampled_from([1, 2, 2, 4]), BAD_SIZES), label="num_heads")
    try:
        layer = mha.MultiHeadAttention(E, H, backend=backend_name, **kwargs)
    except (ValueError, TypeError) as err:
        return named(err)
    B, T, S = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5))
    q = data.draw(arrays((B, T, layer.embed_dim)), label="query")
    cross = data.draw(st.booleans())
    k = data.draw(arrays((B, S, layer.kdim)), label="key") if cross else None
    v = data.draw(arrays((B, S, layer.vdim)), label="value") if cross and data.draw(st.booleans()) else None
    Sx = S if cross else T
    call = dict(mask=data.draw(masks(B, layer.num_heads, T, Sx), label="mask"),
                causal=data.draw(mostly(st.booleans(), st.sampled_from([1, "yes"]), 10), label="causal"),
                return_weights=data.draw(st.booleans(), label="return_weights"))
    if data.draw(st.booleans()):
        km = np.random.default_rng(1).random((B, Sx)) < 0.6
        call["key_mask"] = data.draw(mostly(st.sampled_from([km, km.astype(int)]),
                                            st.sampled_from([km[:, :-1] if Sx else km * 1.0, km * 3.0]), 10),
                                     label="key_mask")
    if data.draw(st.booleans()):
        hm = np.random.default_rng(2).normal(size=(B, layer.num_heads))
        call["head_mask"] = data.draw(mostly(st.sampled_from([hm[0] if B else np.ones(layer.num_heads), hm]),
                                             st.just(np.ones(layer.num_heads + 1)), 10), label="head_mask")
    try:
        res = layer(q, k, v, **call)
    except (ValueError, TypeError) as err:
        return named(err)
    # Accepted: the result must be right.
    out, P = (res if call["return_weights"] is True else (res, None))
    out = mha.to_numpy(out).astype(np.float64)
    qa = np.asarray(q, np.float64)
    batched = qa.ndim == 3
    ka = qa if k is None else np.asarray(k, np.float64)
    va = ka if v is None else np.asarray(v, np.float64)
    if not batched:
        qa, ka, va = qa[None], ka[None], va[None]
    m = call["mask"]
    if m is not None and not batched:
        m = np.asarray(m)[None] if np.ndim(m) == 3 else m
    km = call.get("key_mask")
    if km is not None and not batched:
        km = np.asarray(km).reshape(1, -1)
    hm = call.get("head_mask")
    w = layer.weights
    y_ref, P_ref = oracle.attention(w, qa, ka, va, mask=m, key_mask=km, causal=call["causal"] is True,
                                    head_mask=hm, scale=layer.scale)
    y_ref = y_ref if batched else y_ref[0]
    assert out.shape == y_ref.shape
    assert np.isfinite(out).all()
    M = tolerance.magnitude(w, qa, ka, va, y_ref=y_ref, scale=layer.scale, mask=m, head_mask=hm)
    tolerance.assert_close(out, y_ref, 2 * tolerance.t1(layer.dtype, M), "fuzzed call vs oracle")
    if P is not None:
        P = mha.to_numpy(P)
        assert P.shape == (P_ref.shape if batched else P_ref.shape[1:]) and np.isfinite(P).all()


@pytest.mark.parametrize("backend_name", ["numpy", "mlx"])
def test_one_layer_called_from_many_threads(backend_name):
    """Concurrent calls on one layer give exactly what sequential calls give."""
    if backend_name == "mlx":
        pytest.importorskip("mlx.core")
    layer = mha.MultiHeadAttention.from_weights(random_weights(24, 4, Hkv=2, seed=1), backend=backend_name)
    inputs = [normal((2, 5 + i % 4, 24), i) for i in range(16)]
    expected = [mha.to_numpy(layer(x, causal=bool(i % 2), return_weights=bool(i % 3 == 0))[0]
                             if i % 3 == 0 else layer(x, causal=bool(i % 2))) for i, x in enumerate(inputs)]
    results: dict = {}

    def work(t):
        for rep in range(5):
            for i in range(t, len(inputs), 4):
                x = inputs[i]
                out = layer(x, causal=bool(i % 2), return_weights=bool(i % 3 == 0))
                results[(t, rep, i)] = mha.to_numpy(out[0] if i % 3 == 0 else out)

    in_threads(work, 4)
    assert len(results) == 5 * len(inputs)
    for (t, rep, i), out in results.items():
        np.testing.assert_array_equal(out, expected[i])
