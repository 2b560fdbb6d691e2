"""Empty rows, non-finite numbers at hidden positions, degenerate sizes, half precision."""

from __future__ import annotations

import numpy as np
import pytest

import mha

from tests.helpers import normal, random_bool, random_weights

B, T, S, E, H = 3, 5, 7, 12, 4


def _layer(backend, **kw):
    w = random_weights(E, H, Hkv=kw.pop("Hkv", 2), seed=kw.pop("seed", 0))
    return mha.MultiHeadAttention.from_weights(w, backend=backend, **kw), w


def _both(layer, *args, **kw):
    """(fast output, weights-path output, weights) as numpy."""
    y_fast = mha.to_numpy(layer(*args, **kw))
    y, P = layer(*args, return_weights=True, **kw)
    return y_fast, mha.to_numpy(y), mha.to_numpy(P)


@pytest.mark.parametrize("how", ["bool-rows", "key-mask-batch", "additive-inf", "causal-T>S", "combined"])
def test_query_with_no_key_outputs_the_bias(backend, how):
    layer, w = _layer(backend)
    x, kv = normal((B, T, E), 1), normal((B, S, E), 2)
    kw = {}
    if how == "bool-rows":
        m = random_bool((B, H, T, S), 3)
        m[0, :, 2, :] = False
        m[2, :, 0, :] = False
        kw["mask"], empty = m, ~m.any(-1).all(1)
    elif how == "key-mask-batch":
        km = np.ones((B, S), bool)
        km[1] = False
        kw["key_mask"], empty = km, np.zeros((B, T), bool)
        empty[1] = True
    elif how == "additive-inf":
        a = normal((B, 1, T, S), 4)
        a[:, :, 3, :] = -np.inf
        kw["mask"], empty = a, np.zeros((B, T), bool)
        empty[:, 3] = True
    elif how == "causal-T>S":
        x, kv = normal((B, 9, E), 5), normal((B, 4, E), 6)
        kw["causal"], empty = True, np.zeros((B, 9), bool)
        empty[:, :5] = True
    else:
        km = np.ones((B, S), bool)
        km[:, -3:] = False
        m = np.ones((T, S), bool)
        m[4, :4] = False
        kw.update(key_mask=km, mask=m, causal=True)
        empty = np.zeros((B, T), bool)
        empty[:, 4] = True  # causal allows keys 0..6, key_mask hides 4..6, mask hides 0..3
    y_fast, y, P = _both(layer, x, kv, **kw)
    assert np.isfinite(y_fast).all() and np.isfinite(y).all() and np.isfinite(P).all()
    assert empty.any()
    b_idx, t_idx = np.nonzero(empty)
    np.testing.assert_array_equal(y_fast[b_idx, t_idx], np.broadcast_to(w.o_bias, (len(b_idx), E)))
    np.testing.assert_array_equal(y[b_idx, t_idx], np.broadcast_to(w.o_bias, (len(b_idx), E)))
    assert np.all(P[b_idx, :, t_idx] == 0.0)
    sums = P.sum(-1)  # (B, H, T)
    np.testing.assert_allclose(sums[~np.broadcast_to(empty[:, None], sums.shape)], 1.0, atol=2 * S * 2**-24)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rw", [False, True], ids=["fast", "weights"])
def test_nonfinite_at_hidden_keys_never_reaches_the_output(backend, bad, rw):
    layer, _ = _layer(backend)
    x, k, v = normal((B, T, E), 1), normal((B, S, E), 2), normal((B, S, E), 3)
    km = np.ones((B, S), bool)
    km[:, [1, 5]] = False
    m = np.ones((B, 1, T, S), bool)
    m[:, :, :2, 3] = False  # key 3 hidden from queries 0 and 1 only
    m[0, :, :, 6] = False  # key 6 hidden from every query of batch 0

    def run(k_, v_):
        out = layer(x, k_, v_, key_mask=km, mask=m, return_weights=rw)
        return mha.to_numpy(out[0] if rw else out)

    clean = run(k, v)
    kb, vb = k.copy(), v.copy()
    kb[:, [1, 5]] = bad
    vb[:, [1, 5]] = bad
    kb[0, 6, 0] = bad
    vb[0, 6, 2] = bad
    np.testing.assert_array_equal(run(kb, vb), clean)  # bitwise: hidden is hidden
    kb[:, 3] = bad  # key 3 visible to queries 2.. : those rows, and only those, go non-finite
    vb[:, 3] = bad
    dirty = run(kb, vb)
    np.testing.assert_array_equal(dirty[:, :2], clean[:, :2])
    assert not np.isfinite(dirty[:, 2:]).any()


@pytest.mark.parametrize("how", ["no-mask", "causal", "key-mask"])
def test_a_key_whose_logits_are_minus_inf_still_makes_its_rows_nan(backend, how):
    """A key holding -inf whose logits are exactly -inf (every product q_d * k_d is -inf: q > 0, k = -inf)
    gets weight exp(-inf) = 0 in a softmax, so a kernel left alone returns finite rows; the rule is that
    a visible key holding NaN/inf makes the rows that see it NaN. Positive W_q, W_k and a positive query
    make it so; cross-attention keeps the values finite (a value of -inf would give 0 * inf = NaN by
    arithmetic alone). Without a mask the MLX layer applies the rule by a per-batch NaN added to the
    output bias, which nothing else here would notice missing."""
    rng = np.random.default_rng(7)
    D = E // H
    pos = lambda o, i: (rng.uniform(0.5, 1.5, size=(o, i)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
    w = mha.AttentionWeights(pos(H * D, E), pos(2 * D, E), rng.normal(size=(2 * D, E)).astype(np.float32),
                             rng.normal(size=(E, H * D)).astype(np.float32), np.full(H * D, 0.25, np.float32),
                             np.full(2 * D, 0.25, np.float32), np.zeros(2 * D, np.float32),
                             np.full(E, 0.5, np.float32), num_heads=H, num_kv_heads=2)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    x = rng.uniform(0.1, 1.0, size=(B, T, E)).astype(np.float32)
    k, v = normal((B, S, E), 2), normal((B, S, E), 3)
    kw = {"no-mask": {}, "causal": {"causal": True}, "key-mask": {"key_mask": np.ones((B, S), bool)}}[how]
    clean = mha.to_numpy(layer(x, k, v, **kw))
    assert np.isfinite(clean).all()
    j = S - 1 if how == "causal" else 2  # causal, bottom-right: the last key is seen by the last query only
    k[1, j] = -np.inf
    dirty = mha.to_numpy(layer(x, k, v, **kw))
    seen = np.zeros((B, T), bool)
    seen[1] = True
    if how == "causal":
        seen[1, :-1] = False
    assert np.isnan(dirty[seen]).all(), "rows that see the key must be NaN"
    np.testing.assert_array_equal(dirty[~seen], clean[~seen])


def test_nonfinite_query_touches_only_its_row(backend):
    layer, _ = _layer(backend)
    x, kv = normal((B, T, E), 1), normal((B, S, E), 2)
    clean = mha.to_numpy(layer(x, kv))
    x[1, 2, 5] = np.nan
    dirty = mha.to_numpy(layer(x, kv))
    assert np.isnan(dirty[1, 2]).all()
    dirty[1, 2] = clean[1, 2]
    np.testing.assert_array_equal(dirty, clean)


@pytest.mark.parametrize("T_,S_", [(1, 1), (1, 6), (6, 1), (0, 4), (4, 0), (0, 0)])
def test_degenerate_lengths(backend, T_, S_):
    layer, w = _layer(backend)
    x, kv = normal((2, T_, E), 1), normal((2, S_, E), 2)
    y, P = layer(x, kv, return_weights=True)
    y_fast = mha.to_numpy(layer(x, kv, causal=True))
    assert mha.to_numpy(y).shape == (2, T_, E) and mha.to_numpy(P).shape == (2, H, T_, S_)
    assert np.isfinite(mha.to_numpy(y)).all() and np.isfinite(y_fast).all()
    if S_ == 0:
        np.testing.assert_array_equal(mha.to_numpy(y), np.broadcast_to(w.o_bias, (2, T_, E)))
    if S_ == 1 and T_ > 0:
        np.testing.assert_array_equal(mha.to_numpy(P), 1.0)


def test_head_dim_one_and_many_heads(backend):
    w = random_weights(6, 6, Hkv=3, seed=4)  # D = 1
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    x = normal((64, 3, 6), 5)
    y_fast, y, P = _both(layer, x, causal=True)
    np.testing.assert_allclose(y_fast, y, atol=1e-5)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("sign", [1, -1])
def test_huge_logits_stay_finite(backend, sign):
    layer, _ = _layer(backend, scale=1e3)
    x = normal((B, T, E), 1, sigma=30.0)
    a = np.full((1, 1, T, T), sign * 1e4, np.float32)
    y_fast, y, P = _both(layer, x, mask=a, causal=True)
    assert np.isfinite(y_fast).all() and np.isfinite(y).all() and np.isfinite(P).all()
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_mlx(dtype):
    mx = pytest.importorskip("mlx.core")
    from mha.testing import oracle, tolerance

    w = random_weights(E, H, Hkv=2, seed=9)
    layer = mha.MultiHeadAttention.from_weights(w, backend="mlx", dtype=dtype)
    x, kv = normal((B, T, E), 1), normal((B, S, E), 2)
    km = random_bool((B, S), 3)
    km[:, 0] = True
    a = np.where(random_bool((B, 1, T, S), 4), 0.0, -1e4).astype(np.float32)
    y, P = layer(x, kv, key_mask=km, mask=a, causal=True, return_weights=True)
    y_fast = layer(x, kv, key_mask=km, mask=a, causal=True)
    assert y.dtype == getattr(mx, dtype) and y_fast.dtype == getattr(mx, dtype)
    y_ref, _ = oracle.attention(w, x, kv, key_mask=km, mask=a, causal=True)
    # Weights and inputs are rounded to the dtype first; the bound covers that and the arithmetic.
    M = tolerance.magnitude(w, x, kv, y_ref=y_ref)
    for out in (y, y_fast):
        tolerance.assert_close(mha.to_numpy(out), y_ref, 2 * tolerance.t1(dtype, M), f"{dtype} vs float64")
    sums = mha.to_numpy(P).sum(-1)
    visible = sums > 0
    np.testing.assert_allclose(sums[visible], 1.0, atol=S * tolerance.unit_roundoff(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mlx_nonfinite_flags_per_kv_head_and_batch(dtype):
    """The MLX fast path finds NaN/inf keys on the projections before the heads are split: each flag must
    land on its own (batch, kv head, key), and the largest finite numbers must not count as bad."""
    mx = pytest.importorskip("mlx.core")
    from mha_mlx._nonfinite import per_batch, per_key, scan

    B, S, Hkv, D = 4, 7, 3, 5
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((B, S, Hkv * D)).astype(np.float32) for _ in range(2))
    k[3] = v[3] = float(np.finfo(np.float16).max)  # finite, and sums of them overflow: still not bad
    k[1, 4, 7] = -300.0  # the largest |k| of the keys without NaN/inf (in float16 too)
    want = np.zeros((B, Hkv, S), bool)
    for arr, b, s, h, d, bad in ((k, 0, 2, 1, 3, np.nan), (v, 2, 6, 0, 0, np.inf), (k, 2, 0, 2, D - 1, -np.inf)):
        arr[b, s, h * D + d] = bad
        want[b, h, s] = True
    k[3] = -np.float32(np.finfo(np.float16).max) * np.ones_like(k[3])  # keys of batch element 3: the top
    k[0, 2, 1 * D] = 1e30 if dtype == "float32" else 1e4  # beside the NaN of (0, 2, head 1): not counted
    dt = getattr(mx, dtype)
    km, vm = mx.array(k).astype(dt), mx.array(v).astype(dt)
    top = float(mx.array(np.finfo(np.float16).max).astype(dt))  # bfloat16 rounds it
    bad, got_top = per_key(km, vm, Hkv)
    np.testing.assert_array_equal(np.array(bad), want)
    assert float(got_top) == top
    poison, got_top = per_batch(km, vm)
    poison = np.array(poison.astype(mx.float32)).reshape(B)  # 0 where clean, NaN where not
    np.testing.assert_array_equal(np.isnan(poison), want.any(axis=(1, 2)))
    assert (poison[~want.any(axis=(1, 2))] == 0).all()
    assert float(got_top) == top  # batch element 0 holds a NaN: its 1e30 is not counted either
    heads = (a.reshape(B, S, Hkv, D).swapaxes(1, 2) for a in (km, vm))  # (B, Hkv, S, D), a cache's layout
    bad, got_top = scan(*heads)
    np.testing.assert_array_equal(np.array(bad), want)
    assert float(got_top) == top
    empty = mx.zeros((0, S, Hkv * D), dtype=dt)
    assert per_key(empty, empty, Hkv)[0].shape == (0, Hkv, S)
    assert per_batch(empty, empty)[0].shape == (0, 1, 1)
