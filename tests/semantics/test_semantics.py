"""Both backends, both paths (fast and with weights), against the independent float64 oracle.

A grid in the style of MLX's test_fast_sdpa: every mask kind, their combinations, GQA/MQA, cross
attention with kdim/vdim, causal with T < S and T > S, with odd, pairwise-distinct sizes so that a
swapped axis cannot pass. Tolerances are the derived T1 bound of mha.testing.tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.testing import oracle, tolerance

from tests.helpers import normal, random_bool, random_weights

B, T, S = 2, 5, 7


def _mask_bool(shape, seed):
    m = random_bool(shape, seed)
    return m


def _case(name, *, E=12, H=4, Hkv=None, kdim=None, vdim=None, bias=True, T=T, S=S, cross=False,
          scale=None, **call):
    return pytest.param(dict(E=E, H=H, Hkv=Hkv, kdim=kdim, vdim=vdim, bias=bias, T=T, S=S,
                             cross=cross or kdim is not None or vdim is not None or T != S,
                             scale=scale, call=call), id=name)


def _empty_rows_mask():
    m = random_bool((B, 1, T, S), 3)
    m[0, 0, 1, :] = False  # a query with no key
    m[1, 0, 4, :] = False
    return m


def _additive():
    a = normal((B, 4, T, S), 4, sigma=2.0)
    a[random_bool(a.shape, 5, p=0.3)] = -np.inf
    a[1, 2, 3, :] = -np.inf  # an empty row through -inf alone
    return a


def _key_mask():
    km = random_bool((B, S), 6, p=0.6)
    km[0, 0] = True
    km[1, :] = False  # a fully padded batch element
    return km


CASES = [
    _case("self"),
    _case("cross-kdim-vdim", T=3, S=7, kdim=5, vdim=11),
    _case("gqa", E=18, H=6, Hkv=2),
    _case("gqa-cross", E=18, H=6, Hkv=3, T=4, S=9, kdim=7),
    _case("mqa", E=15, H=5, Hkv=1),
    _case("no-bias", bias=False),
    _case("scale", scale=0.37),
    _case("scale-zero", scale=0.0, mask=_empty_rows_mask()),
    _case("bool-mask-4d", mask=_empty_rows_mask()),
    _case("bool-mask-2d", mask=random_bool((T, S), 7)),
    _case("bool-mask-per-head", mask=random_bool((1, 4, T, S), 8)),
    _case("bool-mask-bcast-keys", mask=random_bool((B, 1, 1, S), 9)),
    _case("int-mask", mask=random_bool((B, 4, T, S), 10).astype(np.int64)),
    _case("additive", mask=_additive()),
    _case("key-mask", key_mask=_key_mask()),
    _case("causal", causal=True),
    _case("causal-T>S", T=7, S=4, causal=True),
    _case("causal-T<S-decode", T=2, S=9, causal=True),
    _case("causal-T=1", T=1, S=6, causal=True),
    _case("all-combined", mask=_additive(), key_mask=_key_mask(), causal=True),
    _case("bool-key-causal-gqa", E=18, H=6, Hkv=2, mask=random_bool((B, 6, T, S), 11), key_mask=_key_mask(),
          causal=True),
    _case("head-mask-H", head_mask=np.array([1.0, 0.0, 0.5, -2.0], np.float32)),
    _case("head-mask-BH", head_mask=normal((B, 4), 12)),
]


def _problem(p, seed=0):
    w = random_weights(p["E"], p["H"], Hkv=p["Hkv"], kdim=p["kdim"], vdim=p["vdim"], bias=p["bias"], seed=seed)
    x = normal((B, p["T"], p["E"]), seed + 1)
    if p["cross"]:
        k = normal((B, p["S"], w.kdim), seed + 2)
        v = normal((B, p["S"], w.vdim), seed + 3)
    else:
        k = v = None
    return w, x, k, v


def _run(layer, x, k, v, call, return_weights):
    res = layer(x, k, v, **call, return_weights=return_weights)
    if return_weights:
        return mha.to_numpy(res[0]), mha.to_numpy(res[1])
    return mha.to_numpy(res), None


@pytest.mark.parametrize("p", CASES)
@pytest.mark.parametrize("return_weights", [False, True], ids=["fast", "weights"])
def test_layer_matches_oracle(backend, p, return_weights):
    w, x, k, v = _problem(p)
    layer = mha.MultiHeadAttention.from_weights(w, scale=p["scale"], backend=backend)
    y, P = _run(layer, x, k, v, p["call"], return_weights)
    y_ref, P_ref = oracle.attention(w, x, k, v, scale=p["scale"], **p["call"])
    M = tolerance.magnitude(w, x, k, v, y_ref=y_ref, scale=p["scale"], mask=p["call"].get("mask"),
                            head_mask=p["call"].get("head_mask"))
    tolerance.assert_close(y, y_ref, tolerance.t1("float32", M), "output", f"M={M:.3g}")
    assert y.dtype == np.float32 and y.shape == y_ref.shape
    if return_weights:
        S_ = P_ref.shape[-1]
        tolerance.assert_close(P, P_ref, 2 * S_ * 2.0**-24 + tolerance.t1("float32", M), "weights")
        invisible = ~oracle.visible_keys(*P_ref.shape, mask=p["call"].get("mask"),
                                         key_mask=p["call"].get("key_mask"), causal=p["call"].get("causal", False))
        assert np.all(P[invisible] == 0.0), "a hidden key got weight"
        assert np.all(P >= 0)


@pytest.mark.parametrize("p", CASES)
def test_backends_agree_to_1e_5(p):
    pytest.importorskip("mlx.core")
    w, x, k, v = _problem(p, seed=5)
    ys = []
    for backend in ("numpy", "mlx"):
        for rw in (False, True):
            layer = mha.MultiHeadAttention.from_weights(w, scale=p["scale"], backend=backend)
            ys.append(_run(layer, x, k, v, p["call"], rw)[0])
    scale = max(1.0, float(np.abs(ys[0]).max()))
    for y in ys[1:]:
        assert np.max(np.abs(y - ys[0])) <= 1e-5 * scale


def test_float64_numpy_is_float64_accurate():
    w = random_weights(12, 4, seed=1, dtype=np.float64)
    x = normal((B, T, 12), 2, dtype=np.float64)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy", dtype="float64")
    mask = random_bool((B, 1, T, T), 3)
    mask[0, 0, 2] = False
    y, P = layer(x, mask=mask, causal=True, return_weights=True)
    y_ref, P_ref = oracle.attention(w, x, mask=mask, causal=True)
    M = tolerance.magnitude(w, x, y_ref=y_ref)
    assert y.dtype == np.float64
    tolerance.assert_close(y, y_ref, tolerance.t1("float64", M), "float64 output")
    tolerance.assert_close(layer(x, mask=mask, causal=True), y_ref, tolerance.t1("float64", M), "float64 fast")


def test_unbatched_equals_batch_of_one(backend):
    w = random_weights(12, 4, Hkv=2, seed=2)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    x = normal((T, 12), 3)
    mask = random_bool((4, T, T), 4)
    km = random_bool((T,), 5)
    hm = np.array([1.0, 0.5, 0.0, 2.0], np.float32)
    y, P = layer(x, mask=mask, key_mask=km, head_mask=hm, causal=True, return_weights=True)
    yb, Pb = layer(x[None], mask=mask[None], key_mask=km[None], head_mask=hm, causal=True, return_weights=True)
    assert y.shape == (T, 12) and P.shape == (4, T, T)
    np.testing.assert_array_equal(mha.to_numpy(y), mha.to_numpy(yb)[0])
    np.testing.assert_array_equal(mha.to_numpy(P), mha.to_numpy(Pb)[0])


def test_golden_value_by_hand(backend):
    """One head, D=2, two keys, identity projections: softmax([1, 0]) mixes the two values."""
    eye = np.eye(2, dtype=np.float32)
    w = mha.AttentionWeights(eye, eye, eye, eye, num_heads=1)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend, scale=1.0)
    q = np.array([[[1.0, 0.0]]], np.float32)
    k = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
    v = np.array([[[2.0, 0.0], [0.0, 4.0]]], np.float32)
    y, P = layer(q, k, v, return_weights=True)
    a = np.e / (np.e + 1.0)
    np.testing.assert_allclose(mha.to_numpy(P)[0, 0, 0], [a, 1 - a], rtol=1e-6)
    np.testing.assert_allclose(mha.to_numpy(y)[0, 0], [2 * a, 4 * (1 - a)], rtol=1e-6)
    np.testing.assert_allclose(mha.to_numpy(layer(q, k, v))[0, 0], [2 * a, 4 * (1 - a)], rtol=1e-6)



def test_three_dimensional_mask_is_never_read_silently(backend):
    """A (B, T, S) mask with B == H broadcasts as (H, T, S) under numpy's rules: rejected rather than read
    one way or the other; (1, T, S) is the same either way and accepted, as is (H, T, S) unbatched."""
    layer = mha.MultiHeadAttention(8, 2, backend=backend, seed=0)
    x = normal((2, 3, 8), 0)
    per_example = random_bool((2, 3, 3), 1)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3, 3\) is ambiguous"):
        layer(x, mask=per_example)
    y = mha.to_numpy(layer(x, mask=per_example[:, None]))  # the 4-D form says which
    y0 = mha.to_numpy(layer(x[:1], mask=per_example[:1]))  # (1, T, S): the same either way
    tol = tolerance.t2("float32", "float32", tolerance.magnitude(layer.weights, x, y_ref=y))
    tolerance.assert_close(y[:1], y0, tol, "(1, T, S) mask vs the 4-D per-example mask")
    heads = random_bool((2, 3, 3), 2)  # unbatched: (H, T, S), no B to confuse it with
    y_u = mha.to_numpy(layer(x[0], mask=heads))
    y_4 = mha.to_numpy(layer(x[:1], mask=heads[None]))[0]
    tolerance.assert_close(y_u, y_4, tol, "unbatched (H, T, S) mask vs (1, H, T, S)")
