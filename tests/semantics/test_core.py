"""The seam: MaskSet's positional rule and block cuts, and the attention core (mha.reference.attend and
each backend's) against explicit float64 loops, with softcap and sinks."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha
import mha_cpu
from mha._masks import MaskSet, prepare


def _visible_loop(q_pos, k_pos, causal, window, keep=None):
    """(B?, H?, T, S) by the rule of docs/architecture.md, entry by entry."""
    T, S = len(q_pos), len(k_pos)
    vis = np.ones((1, 1, T, S), bool) if keep is None else np.array(np.broadcast_to(keep, keep.shape[:2] + (T, S)))
    for i in range(T):
        for j in range(S):
            if (causal and k_pos[j] > q_pos[i]) or (window is not None and abs(q_pos[i] - k_pos[j]) >= window):
                vis[..., i, j] = False
    return vis


def _positions(rng, n):
    return np.sort(rng.choice(40, size=n, replace=False)) - 10  # distinct, ascending, some negative


@pytest.mark.parametrize("seed", range(6))
def test_rule_cut_and_key_span_follow_positions(seed):
    """visible() equals the loop over positions (ranges and arrays); every cut equals the cut of the whole;
    key_span never drops a visible key and starts and ends on one."""
    rng = np.random.default_rng(seed)
    T, S = rng.integers(1, 7), rng.integers(1, 9)
    kinds = [(range(S - T, S), range(S)), (_positions(rng, T), _positions(rng, S))]
    keep = rng.random((3, 1, 1 if seed % 2 else T, S)) > 0.3
    for q_pos, k_pos in kinds:
        for causal in (False, True):
            for window in (None, 1, 3):
                m = MaskSet(keep, None, causal, window, q_pos, k_pos)
                want = _visible_loop(list(q_pos), list(k_pos), causal, window, keep)
                np.testing.assert_array_equal(np.broadcast_to(m.visible(np), want.shape), want)
                b, r, c = (1, 3), (T // 2, T), (S // 3, S)
                got = m.cut(batch=b, rows=r, cols=c).visible(np)
                np.testing.assert_array_equal(np.broadcast_to(got, (2, 1, r[1] - r[0], c[1] - c[0])),
                                              want[b[0]:b[1], :, r[0]:r[1], c[0]:c[1]])
                for t0 in range(T):
                    lo, hi = m.key_span(t0, T)
                    rows = m.cut(rows=(t0, T))
                    seen = np.flatnonzero(rows.rule(np).any(0)) if rows.positional else np.arange(S)
                    assert (lo, hi) == ((seen[0], seen[-1] + 1) if seen.size else (lo, lo)), (q_pos, k_pos, t0)


def test_last_visible_is_the_rule_of_causal_alone_over_consecutive_keys():
    """last_visible(): with causal the only rule and keys at a range of step 1 (any offset, T != S, queries
    as a range or an array), row i of rule(np) is keys 0 .. last[i] (last -1: none); else None (a window,
    no rule, keys at array positions)."""
    rng = np.random.default_rng(7)
    used = 0
    for _ in range(300):
        T, S = int(rng.integers(1, 8)), int(rng.integers(1, 9))
        k0, q0 = int(rng.integers(-6, 7)), int(rng.integers(-6, 14))
        q_pos = range(q0, q0 + T) if rng.random() < 0.6 else _positions(rng, T)
        k_pos = range(k0, k0 + S) if rng.random() < 0.8 else _positions(rng, S)
        for causal, window in ((True, None), (True, int(rng.integers(1, 6))), (False, int(rng.integers(1, 6)))):
            m = MaskSet(None, None, causal, window, q_pos, k_pos)
            last = m.last_visible()
            if not (m.causal and m.window is None and isinstance(k_pos, range)):
                assert last is None, (q_pos, k_pos, causal, window)
                continue
            used += 1
            assert last.dtype == np.int64 and last.shape == (T,)
            want = np.arange(S)[None, :] <= last[:, None]  # (T, S): keys 0 .. last[i]
            np.testing.assert_array_equal(m.rule(np), want, str((list(q_pos), k_pos)))
            assert np.all((last >= -1) & (last <= S - 1))
    assert used > 100  # the case itself, not only the Nones, was drawn often


def test_cut_keeps_broadcast_axes_and_drops_rules_that_hide_nothing():
    keep = np.ones((1, 4, 1, 6), bool)
    m = MaskSet.aligned(5, 6, keep=keep, causal=True, window=3)
    c = m.cut(batch=(0, 1), heads=(1, 3), rows=(2, 4), cols=(0, 2))
    assert c.keep.shape == (1, 2, 1, 2) and list(c.q_pos) == [3, 4] and list(c.k_pos) == [0, 1]
    assert not c.causal and c.window == 3  # keys 0, 1 precede queries 3, 4; distances 2..4 reach the window
    assert MaskSet.aligned(1, 9, causal=True).every_key_visible  # one query at the end sees every key
    assert MaskSet.aligned(4, 9, window=9).window is None


def _attend_loop(q, k, v, vis, bias, scale, softcap, sinks):
    """float64 (context, lse, weights) of one call, row by row."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    ctx, lse, w = np.zeros((B, H, T, D)), np.full((B, H, T), -np.inf), np.zeros((B, H, T, S))
    for b, h, i in np.ndindex(B, H, T):
        g = h // (H // Hkv)
        js = np.flatnonzero(vis[b, h, i])
        z = np.array([scale * float(q[b, h, i] @ k[b, g, j]) for j in js])
        if softcap is not None:
            z = softcap * np.tanh(z / softcap)
        z = z + bias[b, h, i, js]
        terms = list(z) + ([float(sinks[h])] if sinks is not None else [])
        if not terms:
            continue
        top = max(terms)
        lse[b, h, i] = top + math.log(sum(math.exp(t - top) for t in terms))
        w[b, h, i, js] = np.exp(z - lse[b, h, i])
        ctx[b, h, i] = w[b, h, i, js] @ v[b, g, js]
    return ctx, lse, w


def _reference(*args, **kwargs):
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # +-inf past the range, as documented
        return mha.reference.attend(np, *args, **kwargs)


CORES = {"reference": _reference, "numpy": mha_cpu.attend}


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("softcap,sinks", [(None, None), (2.5, None), (None, True), (1.5, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attend_equals_the_loop(core, softcap, sinks, dtype):
    """Odd distinct sizes, GQA, bias, key padding that empties a row, causal at offset positions; the
    logits large enough (x3) that the soft-cap matters, and the guard: without the feature it differs."""
    rng = np.random.default_rng(7)
    B, H, Hkv, T, S, D = 2, 6, 3, 5, 7, 4
    q, k, v = (rng.standard_normal(s) * 3 for s in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    bias = rng.standard_normal((1, H, T, S))
    km = rng.random((B, S)) > 0.3
    km[1] = False  # batch element 1 sees nothing
    sink = rng.standard_normal(H) if sinks else None
    m = prepare(np, mask=bias.astype(dtype), key_mask=km, causal=True, bias_dtype=dtype, q_pos=range(3, 3 + T),
                k_pos=range(1, 1 + S))
    args = [a.astype(dtype) for a in (q, k, v)]
    ctx, lse, w = CORES[core](*args, m, scale=0.6, softcap=softcap, sinks=sink, return_weights=True)
    vis = np.broadcast_to(m.visible(np), (B, H, T, S))
    want = _attend_loop(q, k, v, vis, np.broadcast_to(bias, (B, H, T, S)), 0.6, softcap, sink)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for got, exp in zip((ctx, lse, w), want):
        np.testing.assert_allclose(got, exp, rtol=tol, atol=tol * 10)
    if sinks:  # rows with no visible key: lse = the sink, zero context; weights sum to 1 - the sink's share
        np.testing.assert_allclose(lse[1], np.broadcast_to(sink[:, None], (H, T)), rtol=tol)
        np.testing.assert_allclose(w.sum(-1), 1 - np.exp(sink[:, None] - lse), rtol=tol, atol=tol)
    off = _attend_loop(q, k, v, vis, np.broadcast_to(bias, (B, H, T, S)), 0.6, None, None)
    if softcap or sinks:
        assert np.abs(off[0] - ctx).max() > 1e-2


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("dtype,mag", [(np.float32, 1e37), (np.float32, 3e38), (np.float64, 1e170),
                                       (np.float64, 1e300)])
def test_attend_is_finite_at_every_magnitude(core, dtype, mag):
    """q and k near the dtype's limit (issue 29): finite weights and contexts; the largest logit of each
    row gets the most weight, as in float64 with the logits divided by the magnitude squared."""
    rng = np.random.default_rng(3)
    B, H, T, S, D = 1, 2, 3, 5, 4
    q = rng.uniform(-1, 1, (B, H, T, D))
    k = rng.uniform(-1, 1, (B, H, S, D))
    v = rng.standard_normal((B, H, S, D))
    m = MaskSet.aligned(T, S, causal=True)
    ctx, lse, w = CORES[core]((q * mag).astype(dtype), (k * mag).astype(dtype), v.astype(dtype), m, scale=0.5,
                              return_weights=True)
    assert np.isfinite(ctx).all() and np.isfinite(w).all()
    vis = np.broadcast_to(m.visible(np), w.shape)
    top = np.argmax(np.where(vis, q @ k.swapaxes(-1, -2), -np.inf), axis=-1)
    np.testing.assert_array_equal(np.argmax(w, axis=-1), top)
    np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-5)


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_near_the_dtype_limit_give_a_finite_context(core, dtype):
    """Values near the dtype's largest number: the weighted sum a kernel accumulates before dividing by the
    row sum passes the range (sum_j e_j v_j with e_j up to the band's top), the true context does not. It is
    finite and equals the float64 context of the values scaled down, times the scale."""
    rng = np.random.default_rng(5)
    B, H, T, S, D = 1, 2, 3, 6, 4
    big = float(np.finfo(dtype).max) / 2
    q, k = rng.standard_normal((B, H, T, D)), rng.standard_normal((B, H, S, D))
    v = rng.uniform(0.5, 1.0, (B, H, S, D))
    m = MaskSet.aligned(T, S)
    ctx = CORES[core](q.astype(dtype), k.astype(dtype), (v * big).astype(dtype), m, scale=0.5)[0]
    want = _attend_loop(q, k, v, np.ones((B, H, T, S), bool), np.zeros((B, H, T, S)), 0.5, None, None)[0]
    assert np.isfinite(ctx).all()
    np.testing.assert_allclose(np.asarray(ctx, np.float64) / big, want, rtol=1e-4)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("core", ["reference", "numpy", "mlx"])
def test_attend_with_no_key_at_all(core, sinks):
    """S = 0: every row sees no key, so context 0 and lse -inf (with sinks: the sink's logit alone, as the
    loop gives), weights (B, H, T, 0); the cores routed such calls to the reference, whose max over an
    empty axis raised."""
    B, H, Hkv, T, D = 2, 4, 2, 3, 5
    q = np.random.default_rng(0).standard_normal((B, H, T, D)).astype(np.float32)
    k = v = np.zeros((B, Hkv, 0, D), np.float32)
    s = np.array([0.5, -1.0, 2.0, 0.0], np.float32) if sinks else None
    masks = MaskSet(None, None, True, None, range(T), range(0))
    want = _attend_loop(q, k, v, np.zeros((B, H, T, 0), bool), np.zeros((B, H, T, 0)), 1.0, None, s)
    if core == "mlx":
        mx = pytest.importorskip("mlx.core", reason="needs mlx (pip install mlx)")
        import mha_mlx

        got = mha_mlx.attend(*(mx.array(a) for a in (q, k, v)), masks, scale=1.0, return_weights=True,
                             sinks=None if s is None else mx.array(s))
        for causal in (False, True):  # the fused entry point too (through the core)
            out = mha_mlx.fused_attention(*(mx.array(a) for a in (q, k, v)), scale=1.0, causal=causal)
            np.testing.assert_array_equal(np.asarray(out), np.zeros((B, H, T, D), np.float32))
    else:
        got = CORES[core](q, k, v, masks, scale=1.0, return_weights=True, sinks=s)
    got = [np.asarray(g) for g in got]
    assert [g.shape for g in got] == [(B, H, T, D), (B, H, T), (B, H, T, 0)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
