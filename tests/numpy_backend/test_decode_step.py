"""Decode steps on the numpy backend: a call with nothing but the new token and the cache takes the front
end's decode branch (mha._prepare._decode_step: the same record from fewer checks) and the one core;
each layer option against the float64 oracle over the whole sequence, the calls the branch must leave to
the checked route, and the BLAS thread setting a step restores."""

from __future__ import annotations

import numpy as np
import pytest

import mha
import mha_cpu
from mha import _prepare
from mha.testing import oracle, tolerance

from tests.helpers import in_threads, normal, random_weights


@pytest.fixture(params=[1, None], ids=["blas-held", "blas-threads"])
def taken(monkeypatch, request):
    """Counts the decode steps that took the front end's decode branch; run once with BLAS held at one
    thread and once with BLAS as configured (mha_cpu.options.blas_threads)."""
    with mha_cpu.options.override(blas_threads=request.param):
        yield _count(monkeypatch)


def _count(monkeypatch) -> list:
    """[n]: how many calls from now on took the decode branch (it returned a record, not None)."""
    n, real = [0], _prepare._decode_step

    def spy(*args):
        found = real(*args)
        n[0] += found is not None
        return found

    monkeypatch.setattr(_prepare, "_decode_step", spy)
    return n


def _run(layer, x, prompt: int, **kw):
    """Prefill ``prompt`` tokens, then decode the rest one at a time: (output (B, T, E), weights or
    lse per step)."""
    cache = layer.init_cache(x.shape[0], None)
    first = {k: v for k, v in kw.items() if k == "head_mask"}
    outs, extras = [mha.to_numpy(layer(x[:, :prompt], cache=cache, causal=True, **first))], []
    for i in range(prompt, x.shape[1]):
        r = layer(x[:, i:i + 1], cache=cache, causal=True, **kw)
        if isinstance(r, tuple):
            r, extra = r
            extras.append(mha.to_numpy(extra))
        outs.append(mha.to_numpy(r))
    return np.concatenate(outs, axis=1).astype(np.float64), extras


CASES = {  # name: (E, H, Hkv, layer options, call options)
    "mha": (24, 6, 6, {}, {}),
    # scale * max|W_q| > 2^64: folded into W_q less a power of two, multiplied back at the exp; inputs
    # ~1e-10 (no biases) keep the logits O(1), where a lost factor changes the weights
    "folded-scale": (24, 4, 2, {"scale": 1e20}, {}),
    "gqa": (30, 6, 2, {}, {}),
    "mqa-rope": (20, 4, 1, {"rope": mha.RoPE(dims=4)}, {}),
    "llama": (32, 4, 2, {"rope": mha.RoPE()}, {}),  # no biases (the decoder models' layer)
    "rope-traditional": (24, 3, 3, {"rope": mha.RoPE(dims=8, traditional=True, base=50.0)}, {}),
    "window": (18, 3, 3, {"window": 5}, {}),
    "scale": (24, 6, 3, {"scale": 0.7}, {}),
    "softcap": (24, 6, 2, {"softcap": 0.5}, {}),
    "qk-norm-rope": (24, 4, 2, {"qk_norm": 1e-6, "rope": mha.RoPE(dims=4)}, {}),
    "sinks-window": (18, 3, 3, {"sinks": True, "window": 4}, {}),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_decode_steps_equal_the_oracle(name, dtype, taken):
    """B=3, a prompt of 7 then 6 decoded tokens: the whole output within the derived bound of the float64
    oracle (causal, with the layer's window and RoPE), and every decoded token took the special path."""
    E, H, Hkv, opts, kw = CASES[name]
    tiny = name == "folded-scale"
    w = with_features(random_weights(E, H, Hkv=Hkv, seed=5, bias=not (tiny or name == "llama")), opts)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy", dtype=dtype, **{
        k: v for k, v in opts.items() if k != "sinks"})
    x = (normal((3, 13, E), 1) * (1e-10 if tiny else 1.0)).astype(dtype)
    got, _ = _run(layer, x, 7, **kw)
    want, _ = oracle.attention(w, x, causal=True, rope=opts.get("rope"), window=opts.get("window"),
                               scale=opts.get("scale"), head_mask=kw.get("head_mask"), softcap=opts.get("softcap"),
                               qk_norm=opts.get("qk_norm"))
    M = tolerance.magnitude(w, x, y_ref=want, scale=opts.get("scale"), head_mask=kw.get("head_mask"),
                            max_angle=13.0 if "rope" in opts else 0.0)
    tolerance.assert_close(got, want, tolerance.t1(dtype, M), name)
    assert taken[0] == (6 if "head_mask" not in kw else 0)
    if set(opts) & {"softcap", "qk_norm", "sinks"}:  # the guard: the oracle without the feature differs
        plain = mha.AttentionWeights(**{k: v for k, v in w.to_dict().items() if k not in ("q_norm", "k_norm", "sinks")},
                                     num_heads=H, num_kv_heads=Hkv)
        off, _ = oracle.attention(plain, x, causal=True, rope=opts.get("rope"), window=opts.get("window"))
        assert np.abs(off - want).max() > 100 * tolerance.t1(dtype, M)


def with_features(w, opts):
    """Weights with q/k norm weights and sinks (seeded, far from the identity) when ``opts`` asks."""
    rng = np.random.default_rng(11)
    extra = {}
    if "qk_norm" in opts:
        extra.update(q_norm=rng.uniform(0.3, 3, w.head_dim), k_norm=rng.uniform(0.3, 3, w.head_dim))
    if opts.get("sinks"):
        extra["sinks"] = rng.normal(1.0, 1.5, w.num_heads)
    return mha.AttentionWeights(**w.to_dict(), **extra, num_heads=w.num_heads, num_kv_heads=w.num_kv_heads)


@pytest.mark.parametrize("what", ["return_weights", "return_lse"])
@pytest.mark.parametrize("scale", [None, 1e20])
def test_decode_step_weights_and_lse(what, scale, taken):
    """Weights (B, H, 1, S) and lse (B, H, 1) of each decoded token equal the oracle's last row, also with
    a scale folded into W_q less a power of two (inputs ~1e-10, no biases: logits O(1))."""
    E, H, Hkv = 21, 3, 1
    w = random_weights(E, H, Hkv=Hkv, seed=2, bias=scale is None)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy", scale=scale)
    x = normal((2, 9, E), 4) * np.float32(1.0 if scale is None else 1e-10)
    _, extras = _run(layer, x, 4, **{what: True})
    assert taken[0] == 5
    for n, got in enumerate(extras):
        S = 5 + n
        _, P = oracle.attention(w, x[:, :S], causal=True, scale=scale)
        if what == "return_weights":
            assert got.shape == (2, H, 1, S)
            np.testing.assert_allclose(got, P[:, :, -1:], rtol=0, atol=1e-5)
        else:
            qs, ks, _ = oracle.head_projections(w, x[:, :S], x[:, :S], x[:, :S])
            z = np.stack([np.einsum("bd,bsd->bs", qs[h][:, -1], ks[0]) for h in range(H)], 1)
            z *= 1 / np.sqrt(7) if scale is None else scale
            lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
            assert got.shape == (2, H, 1)
            np.testing.assert_allclose(got[..., 0], lse, rtol=1e-5, atol=1e-5)


def test_decode_step_overflowing_logits_are_rescaled(taken):
    """Inputs ~1e19 make q.k overflow float32 (~1e40): the step rescales instead of returning NaN, and
    agrees with the float64 oracle (whose logits do not overflow)."""
    E, H = 16, 2
    w = random_weights(E, H, seed=7)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy")
    x = normal((1, 6, E), 3) * np.float32(1e19)
    got, _ = _run(layer, x, 3)
    want, _ = oracle.attention(w, x.astype(np.float64), causal=True)
    assert np.isfinite(got).all()
    M = tolerance.magnitude(w, x, y_ref=want)
    tolerance.assert_close(got, want, tolerance.t1("float32", M), "overflow")
    assert taken[0] == 3


def test_padding_two_tokens_and_nan_tokens(taken):
    """Padding stored in the cache (the branch carries it as the key mask), two tokens at once (the checked
    route: causal within them), NaN in the new token (appended once; only its own row is NaN): all equal
    the oracle."""
    E, H = 12, 3
    w = random_weights(E, H, seed=1)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy")
    x = normal((2, 8, E), 6)
    km = np.ones((2, 8), bool)
    km[0, 1] = False
    cache = layer.init_cache(2, None)
    layer(x[:, :5], cache=cache, causal=True, key_mask=km[:, :5])
    got = mha.to_numpy(layer(x[:, 5:6], cache=cache, causal=True))  # padding stored
    want, _ = oracle.attention(w, x[:, :6], causal=True, key_mask=km[:, :6])
    np.testing.assert_allclose(got, want[:, 5:6], rtol=0, atol=1e-5)
    assert taken[0] == 1
    cache = layer.init_cache(2, None)
    layer(x[:, :5], cache=cache, causal=True)
    got = mha.to_numpy(layer(x[:, 5:7], cache=cache, causal=True))  # two tokens: causal within them
    want, _ = oracle.attention(w, x[:, :7], causal=True)
    np.testing.assert_allclose(got, want[:, 5:7], rtol=0, atol=1e-5)
    assert taken[0] == 1
    bad = x[:, 7:8].copy()
    bad[1, 0, 3] = np.nan
    out = mha.to_numpy(layer(bad, cache=cache, causal=True))
    assert cache.offset == 8 and cache.holds_nonfinite  # appended once
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    want, _ = oracle.attention(w, x[:1, :8], causal=True)
    np.testing.assert_allclose(out[:1], want[:, 7:8], rtol=0, atol=1e-5)
    assert taken[0] == 2


def test_decode_step_restores_blas_threads():
    """A step that holds BLAS at one thread (options.blas_threads=1, the default) gives the setting back."""
    import threadpoolctl

    layer = mha.MultiHeadAttention(16, 2, backend="numpy", seed=0)
    cache = layer.init_cache(1, None)
    layer(normal((1, 3, 16), 0), cache=cache, causal=True)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        layer(normal((1, 1, 16), 1), cache=cache, causal=True)
        after = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert before == after and before


def test_decode_steps_from_several_threads():
    """Three threads decode their own caches through one layer at once: each gets bitwise what it gets
    alone (the step keeps no state outside the call and its cache), and BLAS's setting comes back."""
    import threadpoolctl

    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    layer = mha.MultiHeadAttention.from_weights(random_weights(32, 4, Hkv=2, seed=9), backend="numpy")
    xs = [normal((2, 40, 32), s) for s in range(3)]
    alone = [_run(layer, x, 5)[0] for x in xs]
    got = [None] * 3

    def work(i):
        got[i] = _run(layer, xs[i], 5)[0]

    in_threads(work, 3)
    for a, b in zip(got, alone):
        np.testing.assert_array_equal(a, b)
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"] == before


def test_decode_step_strided_and_big_endian_tokens(taken):
    """A token given as a strided view or in big-endian byte order decodes as its plain copy does (the
    big-endian one by the checked route, which converts it)."""
    w = random_weights(24, 4, seed=4)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy")
    x = normal((2, 9, 24), 8)
    c1, c2 = layer.init_cache(2, None), layer.init_cache(2, None)
    layer(x[:, :6], cache=c1, causal=True)
    layer(x[:, :6], cache=c2, causal=True)
    wide = np.zeros((2, 1, 48), np.float32)
    wide[..., ::2] = x[:, 6:7]
    for token in (wide[..., ::2], x[:, 7:8].astype(">f4")):
        plain = np.ascontiguousarray(token, dtype=np.float32)
        np.testing.assert_array_equal(mha.to_numpy(layer(token, cache=c1, causal=True)),
                                      mha.to_numpy(layer(plain, cache=c2, causal=True)))
    assert taken[0] == 3


def test_plain_steps_take_the_branch_and_equal_the_checked_route(monkeypatch, taken):
    """A step called with nothing but the token and the cache skips the front end's checks; its output and
    the cache it leaves are bitwise those of the checked route (forced here by a head_mask of ones)."""
    w = random_weights(24, 6, Hkv=2, seed=2)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy", rope=mha.RoPE(dims=4))
    x = normal((2, 9, 24), 3)
    c1, c2 = layer.init_cache(2, 20), layer.init_cache(2, None)
    for c in (c1, c2):
        layer(x[:, :5], cache=c, causal=True)
    for i in range(5, 9):
        a = layer(x[:, i:i + 1], cache=c1, causal=i % 2 == 0)  # causal or not: one query sees every key
        b = layer(x[:, i:i + 1], cache=c2, causal=True, head_mask=np.ones(6, np.float32))
        np.testing.assert_array_equal(a, b)
    assert taken[0] == 4 and c1.offset == c2.offset == 9 and (c1._start, c1._end) == (c2._start, c2._end)
    for a, b in ((c1.keys, c2.keys), (c1.values, c2.values)):
        np.testing.assert_array_equal(a[:, :, :9], b[:, :, :9])
    np.testing.assert_array_equal(c1.valid[:, :9], c2.valid[:, :9])


def test_the_branch_leaves_every_error_to_the_checked_route():
    """Calls of the branch's form that are wrong still raise the front end's errors, and change nothing."""
    layer = mha.MultiHeadAttention(16, 2, backend="numpy", seed=0)
    other = mha.MultiHeadAttention(16, 4, backend="numpy", seed=0)
    cross = mha.MultiHeadAttention(16, 2, kdim=8, vdim=8, backend="numpy", seed=0)
    cache = layer.init_cache(2, 4)
    layer(normal((2, 3, 16), 0), cache=cache, causal=True)
    token = normal((2, 1, 16), 1)
    cases = [
        (lambda: layer(token, cache=other.init_cache(2, 4)), ValueError, "another kind of layer"),
        (lambda: layer(token[:1], cache=cache), ValueError, "batch_size=2"),
        (lambda: layer(token[..., :8], cache=cache), ValueError, "16"),
        (lambda: layer(token, cache=cache, causal="yes"), TypeError, "causal"),
        (lambda: layer(token, cache=object()), TypeError, "KVCache"),
        (lambda: cross(token, cache=cache), TypeError, "key is required"),  # the cache fits its heads
    ]
    for call, err, words in cases:
        with pytest.raises(err, match=words):
            call()
        assert cache.offset == 3
    layer(token, cache=cache)
    with pytest.raises(ValueError, match="cache is full"):
        layer(token, cache=cache)
    assert cache.offset == 4
    # what the branch does not take, the checked route converts: float64, unbatched, a list
    c64, c1 = layer.init_cache(1, None), layer.init_cache(1, None)
    layer(normal((1, 3, 16), 0), cache=c64, causal=True)
    layer(normal((1, 3, 16), 0), cache=c1, causal=True)
    t = normal((1, 1, 16), 2)
    np.testing.assert_array_equal(layer(t.astype(np.float64), cache=c64), layer(t, cache=c1))
    np.testing.assert_array_equal(layer(t[0].tolist(), cache=c64), layer(t[0], cache=c1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("B, H, Hkv, S, D", [(1, 8, 8, 129, 64), (3, 6, 2, 7, 5), (2, 4, 1, 1, 3), (2, 3, 3, 40, 8)])
def test_the_short_one_query_task_is_bitwise_the_general_task(monkeypatch, dtype, B, H, Hkv, S, D):
    """mha_cpu.attend on one query per row with nothing to mask takes the short form of its one task
    (_kernel.one_query); a keep mask of all True sends the same call through the general task: the same
    bits, for logits in the band and for logits that leave it (the short form then hands over)."""
    from mha_cpu import _kernel

    took, real = [], _kernel.one_query
    monkeypatch.setattr(_kernel, "one_query", lambda *a: took.append(real(*a) is not None) or real(*a))
    rng = np.random.default_rng(B * 100 + S)
    q = rng.standard_normal((B, 1, H, D)).astype(dtype).transpose(0, 2, 1, 3)  # the layer's head view
    k, v = (rng.standard_normal((B, Hkv, S + 5, D)).astype(dtype)[:, :, 2:S + 2] for _ in "kv")  # a cache's slice
    plain = mha.MaskSet(None, None, True, None, range(S - 1, S), range(S))
    every = mha.MaskSet(np.ones((1, 1, 1, S), bool), None, True, None, range(S - 1, S), range(S))
    for size in (1.0, 60.0):  # logits ~1, and ~60 * 60 * D: out of the band, then centred by the general task
        args = (q * size, k * size, v)
        a = mha_cpu.attend(*args, plain, scale=1.0, finite=True)
        assert took == [size == 1.0], took  # the short form ran, and handed over when out of the band
        took.clear()
        b = mha_cpu.attend(*args, every, scale=1.0, finite=True)
        assert took == [], "a keep mask takes the general task"
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert np.isfinite(a[0]).all() and np.isfinite(a[1]).all()
