"""The MLX core, ``mha_mlx.attend`` (= ``layer._attend``), on each of its paths against the float64 loop of
tests/semantics/test_core.py: the fused kernel (no lse asked), unfused (lse or weights asked), blockwise
(a score matrix over the budget; also in tiny blocks); with softcap, sinks, GQA, a bias, key padding
that empties a row, and positions given as offset ranges or as arrays (a ring step, a cache that keeps
its first tokens)."""

from __future__ import annotations

import numpy as np
import pytest

from mha._masks import prepare
from tests.semantics.test_core import _attend_loop

mx = pytest.importorskip("mlx.core")
import mha_mlx  # noqa: E402
from mha_mlx import _blockwise  # noqa: E402

PATHS = ["fused", "lse", "blockwise", "tiny blocks", "weights"]
POSITIONS = {"offset ranges": (range(3, 8), range(1, 8)),  # T = 5 queries, S = 7 keys
             "arrays": (np.array([2, 5, 6, 9, 11]), np.array([0, 1, 2, 6, 7, 10, 11]))}


def _problem(positions, seed=7):
    rng = np.random.default_rng(seed)
    B, H, Hkv, D = 2, 6, 3, 4
    q_pos, k_pos = POSITIONS[positions]
    T, S = len(q_pos), len(k_pos)
    q, k, v = (rng.standard_normal(s) * 3 for s in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    bias = rng.standard_normal((1, H, T, S))
    km = rng.random((B, S)) > 0.3
    km[1] = False  # batch element 1 sees nothing
    return q, k, v, bias, km, q_pos, k_pos, rng.standard_normal(H)


def _attend(path, q, k, v, masks, **kw):
    """(context, lse or None, weights or None) of mha_mlx.attend on one path, as numpy float64."""
    args = [mx.array(a.astype(np.float32)) for a in (q, k, v)]
    if path == "weights":
        out = mha_mlx.attend(*args, masks, return_weights=True, **kw)
    elif path == "tiny blocks":
        with mha_mlx.small_blocks(2, 3):
            out = mha_mlx.attend(*args, masks, **kw)
    elif path == "blockwise":
        with mha_mlx.options.override(score_bytes=0):
            out = mha_mlx.attend(*args, masks, **kw)
    else:
        out = mha_mlx.attend(*args, masks, return_lse=path == "lse", **kw)
    out = list(out) + [None] * (3 - len(out))
    return [None if a is None else np.array(a, np.float64) for a in out]


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("softcap,sinks", [(None, None), (2.5, None), (None, True), (1.5, True)])
@pytest.mark.parametrize("path", PATHS)
def test_every_path_equals_the_loop(path, softcap, sinks, positions, monkeypatch):
    q, k, v, bias, km, q_pos, k_pos, sink = _problem(positions)
    seen = []
    real = _blockwise.attention
    monkeypatch.setattr(_blockwise, "attention", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    m = prepare(mx, mask=mx.array(bias.astype(np.float32)), key_mask=mx.array(km), causal=True,
                bias_dtype=mx.float32, window=4, q_pos=q_pos, k_pos=k_pos)
    sink = sink if sinks else None
    ctx, lse, w = _attend(path, q, k, v, m, scale=0.6, softcap=softcap, sinks=None if sink is None else mx.array(sink))
    B, H, T, S = q.shape[0], q.shape[1], len(q_pos), len(k_pos)
    vis = np.broadcast_to(np.array(m.visible(mx)), (B, H, T, S))
    want = _attend_loop(q, k, v, vis, np.broadcast_to(bias, (B, H, T, S)), 0.6, softcap, sink)
    tol = 2e-5
    np.testing.assert_allclose(ctx, want[0], rtol=tol, atol=tol * 10, err_msg="context")
    if path == "fused":  # no lse asked: None (a softcap runs unfused, the kernel cannot cap)
        assert lse is None
    else:
        np.testing.assert_allclose(lse, want[1], rtol=tol, atol=tol * 10, err_msg="lse")
    if path == "weights":
        np.testing.assert_allclose(w, want[2], rtol=tol, atol=tol * 10, err_msg="weights")
    assert bool(seen) == (path in ("blockwise", "tiny blocks")), "the path taken"
    assert (ctx[1] == 0).all(), "a row that sees no key has context 0"
    off = _attend_loop(q, k, v, vis, np.broadcast_to(bias, (B, H, T, S)), 0.6, None, None)
    if softcap or sinks:  # the guard: the features change the result
        assert np.abs(off[0] - ctx).max() > 1e-2


def test_the_kernel_s_causal_is_used_only_where_positions_align():
    """A plain causal call hands the kernel its own "causal" (aligned at the end); positions that are not
    aligned so (a ring's pair of spans) get the explicit rule: both equal the loop."""
    from mha_mlx._core import _aligned

    q, k, v, bias, km, _, _, _ = _problem("offset ranges")
    for q_pos, k_pos, aligned in ((range(2, 7), range(7), True), (range(3, 8), range(1, 8), True),
                                  (range(0, 5), range(7), False), (range(10, 15), range(3, 10), False)):
        m = prepare(mx, mask=None, key_mask=None, causal=True, bias_dtype=mx.float32, q_pos=q_pos, k_pos=k_pos)
        assert _aligned(m) == aligned or not m.causal
        ctx = _attend("fused", q, k, v, m, scale=0.6)[0]
        vis = np.broadcast_to(np.array(m.visible(mx)) if m.visible(mx) is not None else True, (2, 6, 5, 7))
        want = _attend_loop(q, k, v, vis, np.zeros((2, 6, 5, 7)), 0.6, None, None)[0]
        np.testing.assert_allclose(ctx, want, rtol=2e-5, atol=2e-4, err_msg=f"{q_pos}, {k_pos}")
