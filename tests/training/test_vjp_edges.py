"""mha.vjp at the edges: empty rows, NaN at hidden positions, dropout's one draw, blocks, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.testing.gradients import oracle_vjp

from tests.helpers import normal, random_bool, random_weights

B, T, S, E, H = 2, 5, 7, 12, 4


def grads(g):
    """Gradients as a dict of float64 numpy arrays (None kept)."""
    d = dict(query=g.query, key=g.key, value=g.value, **g.weights.to_dict())
    return {n: None if a is None else mha.to_numpy(a).astype(np.float64) for n, a in d.items()}


def test_fully_masked_rows_give_zero_gradients(backend):
    """A query that sees no key: its row of g.query is exactly 0 (cross-attention), a batch element whose
    keys are all padding gets exactly zero gradients for its keys and values, and nothing is NaN."""
    w = random_weights(E, H, Hkv=2, seed=1)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    x, kv, dy = normal((B, T, E), 2), normal((B, S, E), 3), normal((B, T, E), 4)
    m = random_bool((B, 1, T, S), 5)
    m[0, 0, 2] = False
    km = np.ones((B, S), bool)
    km[1] = False
    _, pull = mha.vjp(layer, x, kv, mask=m, key_mask=km)
    g = grads(pull(dy))
    assert all(np.isfinite(a).all() for a in g.values() if a is not None)
    assert not g["query"][0, 2].any() and not g["query"][1].any()
    assert not g["key"][1].any()
    assert g["query"][0, 1].any()  # rows that see keys do get gradients


def test_nan_at_hidden_positions_stays_isolated(backend):
    """NaN/inf at keys no query sees and in a query row that sees nothing: every gradient equals the one
    with those entries replaced by finite numbers (bitwise on numpy), and is finite."""
    w = random_weights(E, H, seed=1)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    x, kv, dy = normal((B, T, E), 2), normal((B, S, E), 3), normal((B, T, E), 4)
    km = np.ones((B, S), bool)
    km[0, 2] = km[1, 5] = False
    m = np.ones((B, 1, T, S), bool)
    m[0, 0, 1] = False
    bad_kv, bad_x = kv.copy(), x.copy()
    bad_kv[0, 2], bad_kv[1, 5, 3], bad_x[0, 1, 4] = np.nan, np.inf, np.nan
    found = []
    for xi, kvi in ((x, kv), (bad_x, bad_kv)):
        out, pull = mha.vjp(layer, xi, kvi, mask=m, key_mask=km)
        assert np.isfinite(mha.to_numpy(out)).all()
        found.append(grads(pull(dy)))
    for n, a in found[0].items():
        if a is None:
            continue
        b = found[1][n]
        assert np.isfinite(b).all(), n
        if backend == "numpy":
            assert np.array_equal(a, b), n
        else:
            assert np.allclose(a, b, rtol=1e-5, atol=1e-5), n


def test_nan_at_a_visible_key_propagates():
    """A NaN a query can see makes its output NaN, and the gradients it reaches NaN (as autograd's)."""
    w = random_weights(E, H, seed=1)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy")
    kv = normal((B, S, E), 3)
    kv[0, 2, 0] = np.nan
    out, pull = mha.vjp(layer, normal((B, T, E), 2), kv)
    g = grads(pull(normal((B, T, E), 4)))
    assert np.isnan(mha.to_numpy(out)[0]).all() and np.isfinite(mha.to_numpy(out)[1]).all()
    assert np.isnan(g["k_weight"]).any() and np.isfinite(g["query"][1]).all()


def test_dropout_one_draw_for_forward_and_backward(backend):
    """training=True with dropout: the output and the gradients both use the draw the forward made (the
    loop oracle with that draw agrees), repeated pulls agree, and the layer's dropout stream then goes
    on as after one call."""
    w = random_weights(E, H, seed=2)
    make = lambda: mha.MultiHeadAttention.from_weights(w, backend=backend, dropout=0.4, seed=7)  # noqa: E731
    layer, twin = make(), make()
    x, dy = normal((B, T, E), 1), normal((B, T, E), 2)
    drop = mha.to_numpy(twin._dropout_multiplier((B, H, T, T), 0.4, twin._dtypes()[1]))
    out, pull = mha.vjp(layer, x, training=True, causal=True)
    y_ref, g_ref = oracle_vjp(w, x, x, x, dy, causal=True, dropout=drop)
    assert np.abs(mha.to_numpy(out) - y_ref).max() < 1e-5
    g1, g2 = grads(pull(dy)), grads(pull(dy))
    total = g_ref["query"] + g_ref["key"] + g_ref["value"]
    assert np.abs(g1["query"] - total).max() < 1e-4 * np.abs(total).max()
    assert all(a is None or np.array_equal(a, g2[n]) for n, a in g1.items())
    assert np.array_equal(mha.to_numpy(layer(x, training=True)), mha.to_numpy(twin(x, training=True)))


def test_blocks_and_threads_give_the_same_gradients():
    """numpy: tiny blocks (2 queries x 3 keys: rows cross key blocks, taking the forward's lse), a pool
    of workers and chunks of queries give the default path's gradients within float32 rounding."""
    import mha_cpu

    w = random_weights(E, H, Hkv=1, seed=3)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy")
    x, kv, dy = normal((B, 11, E), 1), normal((B, 13, E), 2), normal((B, 11, E), 3)
    kw = dict(mask=random_bool((B, 1, 11, 13), 4), causal=True)
    _, pull = mha.vjp(layer, x, kv, **kw)
    base = grads(pull(dy))
    with mha_cpu.small_blocks(2, 3):
        _, pull = mha.vjp(layer, x, kv, **kw)
        small = grads(pull(dy))
    for n, a in base.items():
        if a is not None:
            assert np.abs(small[n] - a).max() <= 1e-5 * max(1.0, np.abs(a).max()), n


def test_no_query_or_no_key(backend):
    """T = 0 or S = 0: the output is the output bias; only o_weight/o_bias can get gradients."""
    w = random_weights(E, H, seed=1)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    out, pull = mha.vjp(layer, normal((B, T, E), 1), normal((B, 0, E), 2))
    dy = normal((B, T, E), 3)
    g = grads(pull(dy))
    assert np.allclose(mha.to_numpy(out), np.broadcast_to(w.o_bias, (B, T, E)))
    assert np.allclose(g["o_bias"], dy.sum((0, 1)), atol=1e-5)
    assert not g["q_weight"].any() and not g["o_weight"].any() and g["key"].shape == (B, 0, E)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.fixture
def pulled():
    layer = mha.MultiHeadAttention(E, H, seed=0, backend="numpy")
    return mha.vjp(layer, normal((B, T, E), 1), causal=True)


def test_bad_cotangent_raises_before_work(pulled):
    _, pull = pulled
    with pytest.raises(ValueError, match=r"d_out must have the output's shape \(2, 5, 12\).*got \(2, 5, 11\)"):
        pull(np.zeros((B, T, E - 1), np.float32))
    with pytest.raises(TypeError, match="d_out must hold real floats.*int64"):
        pull(np.zeros((B, T, E), np.int64))
    bad = np.zeros((B, T, E), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="d_out holds NaN or inf"):
        pull(bad)
    with pytest.raises(ValueError, match="d_out must be an array"):
        pull([[1.0], [1.0, 2.0]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache="c"), "cache=.*has no gradient: decoding with a cache"),
    (dict(return_weights=True), "return_weights=True has no gradient"),
    (dict(return_lse=True), "return_lse=True has no gradient"),
])
def test_call_features_without_gradients_are_named(kwargs, match):
    layer = mha.MultiHeadAttention(E, H, seed=0, backend="numpy")
    with pytest.raises(ValueError, match=match):
        mha.vjp(layer, normal((B, T, E), 1), **kwargs)


def test_other_bad_arguments():
    layer = mha.MultiHeadAttention(E, H, seed=0, backend="numpy")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['maks'\]"):
        mha.vjp(layer, normal((B, T, E), 1), maks=None)
    with pytest.raises(TypeError, match="needs an mha.MultiHeadAttention layer, got function"):
        mha.vjp(lambda x: x, normal((B, T, E), 1))
    with pytest.raises(ValueError, match="query"):  # the layer's own checks, before any work
        mha.vjp(layer, normal((B, T, E + 1), 1))
    with pytest.raises(ValueError, match="mask"):
        mha.vjp(layer, normal((B, T, E), 1), mask=np.ones((3, 3), bool))
