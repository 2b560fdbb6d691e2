"""The MLX backend used as users use it: from other threads, with inputs of any layout and byte order.

Threads run in subprocesses: MLX 0.32 aborts the process at exit (exit 134, "terminate called without
an active exception") when a compiled function's trace outlives the thread that made it, and an
unevaluated array belongs to the thread that made it ("There is no Stream(cpu, 0) in current thread").
Long sequences (the blockwise path) are in test_mlx_blockwise.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import mha
from mha.testing import tolerance
from tests.helpers import layouts, normal, random_bool, random_weights

mx = pytest.importorskip("mlx.core")
import mha_mlx  # noqa: E402

_THREADS = r'''
import sys, threading
import numpy as np, mlx.core as mx
import mha
from tests.helpers import normal, random_bool, random_weights

def in_thread(fn, *args):
    """fn(*args) on a new thread, joined; its result as numpy, evaluated on that thread (an exception is
    re-raised here)."""
    box = {}
    def run():
        try:
            box["out"] = mha.to_numpy(fn(*args))
        except BaseException as err:
            box["err"] = err
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]

def same(a, b, what):
    a, b = mha.to_numpy(a), mha.to_numpy(b)
    assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), what

weights = random_weights(24, 4, Hkv=2, seed=1)
layer = mha.MultiHeadAttention.from_weights(weights, backend="mlx")
x = normal((2, 5, 24), 0)
km = random_bool((2, 5), 1, p=0.8)
calls = [dict(), dict(causal=True), dict(key_mask=km), dict(mask=random_bool((2, 4, 5, 5), 2))]
scenario = sys.argv[1]

if scenario == "one":  # the smallest case: one call from one thread, the process ending right after
    # (the abort raced the thread's teardown: any work after the join made it rarer)
    from mha.testing import tolerance
    ref = mha.MultiHeadAttention.from_weights(weights, backend="numpy")(x)
    tol = tolerance.t2("float32", "float32", tolerance.magnitude(weights, x, y_ref=ref))
    def check():  # in the thread, so that nothing delays the exit after it
        y = mha.to_numpy(layer(x))
        assert np.abs(y - ref).max() <= tol, "one call from a thread"
        return y
    in_thread(check)

elif scenario == "many":  # 32 calls on 8 threads, every kind of compiled graph, against the main thread's
    expected = [mha.to_numpy(layer(x, **kw)) for kw in calls]
    out, errors = {}, []
    def work(t):
        try:
            for i in range(4):
                out[t, i] = mha.to_numpy(layer(x, **calls[(t + i) % 4]))
        except BaseException as err:
            errors.append(err)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (t, i), y in out.items():
        same(y, expected[(t + i) % 4], f"thread {t} call {i}")

elif scenario == "state":  # what the main thread made, used from other threads
    xm = mx.array(x)
    mx.eval(xm)
    same(in_thread(layer, xm), layer(xm), "an evaluated mx.array from the main thread")
    for dt in ("float16", "bfloat16"):  # weights converted on the main thread
        half = mha.MultiHeadAttention.from_weights(random_weights(24, 4, seed=2), backend="mlx", dtype=dt)
        same(in_thread(half, x), half(x), dt + " layer built on the main thread")
    # dropout: the stream of keys continues across threads as in one thread
    a, b = (mha.MultiHeadAttention.from_weights(random_weights(24, 4, seed=3), backend="mlx", dropout=0.3,
                                                seed=7) for _ in range(2))
    got = [a(x, training=True), in_thread(lambda: a(x, training=True)), a(x, training=True)]
    for i, y in enumerate(got):
        same(y, b(x, training=True), f"dropout call {i}")
    # a cache made on the main thread, each decoding step on another thread, the last on the main one
    c_threads, c_main = layer.init_cache(2, 8), layer.init_cache(2, 8)
    for t0, t1 in ((0, 3), (3, 4), (4, 5)):
        kw = dict(causal=True, key_mask=km[:, t0:t1])
        y = layer(x[:, t0:t1], cache=c_threads, **kw) if t0 == 4 else in_thread(
            lambda: layer(x[:, t0:t1], cache=c_threads, **kw))
        same(y, layer(x[:, t0:t1], cache=c_main, **kw), f"decoding step {t0}")
    # several layers at once, each called from its own threads
    layers = [mha.MultiHeadAttention.from_weights(random_weights(24, H, seed=s), backend="mlx")
              for s, H in ((4, 2), (5, 3), (6, 8))]
    expected = [mha.to_numpy(m(x, causal=True)) for m in layers]
    out = {}
    def call(i, r):
        out[i, r] = mha.to_numpy(layers[i](x, causal=True))
    threads = [threading.Thread(target=call, args=(i, r)) for i in range(3) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (i, r), y in out.items():
        same(y, expected[i], f"layer {i} run {r}")
    assert len(out) == 6
print("OK")
'''


def _run_threads(scenario: str):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", _THREADS, scenario], cwd=root, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("scenario,runs", [("one", 6), ("many", 3), ("state", 2)])
def test_threaded_use_gives_the_same_results_and_exits_cleanly(scenario, runs):
    """Each run in a fresh process. Before: one call from one thread aborted at exit in about half the
    runs of this script (the abort races the thread's teardown; 6 in 6 of the bare repro), 32 calls on
    8 threads in 6 of 6; arrays the main thread made (half-precision weights, the dropout key, a cache)
    could not be used from another thread."""
    for r in range(runs):
        res = _run_threads(scenario)
        assert res.returncode == 0 and res.stdout.strip() == "OK", (
            f"run {r}: exit {res.returncode}, stdout {res.stdout[-300:]!r}, stderr {res.stderr[-600:]!r}")
        assert "terminate" not in res.stderr


def test_gradients_flow_through_a_cached_call():
    """A cached call schedules the evaluation of the cache (for other threads); inside mx.grad that is
    not allowed, and is skipped."""
    import mlx.nn as nn

    layer = mha.MultiHeadAttention.from_weights(random_weights(12, 3, seed=0), backend="mlx")
    x = mx.array(normal((2, 5, 12), 1))

    def loss(model, x):
        return (model(x, cache=model.init_cache(2, 8), causal=True) ** 2).sum()

    value, grads = nn.value_and_grad(layer, loss)(layer, x)
    assert float(value) == pytest.approx(float(loss(layer, x)), rel=1e-6)
    assert np.all(np.isfinite(np.array(grads["q_proj"]["weight"])))


# -- inputs of any layout and byte order ------------------------------------------------------------

B, T, S, E, H = 2, 5, 7, 12, 3
_mask = random_bool((B, H, T, S), 5, p=0.7)
_BASES = {
    "query": {np.float32: normal((B, T, E), 1), np.float64: normal((B, T, E), 1, np.float64),
              np.float16: normal((B, T, E), 1, np.float16), np.int32: (4 * normal((B, T, E), 1)).astype(np.int32)},
    "key": {np.float32: normal((B, S, E), 2), np.float64: normal((B, S, E), 2, np.float64)},
    "value": {np.float32: normal((B, S, E), 3), np.float64: normal((B, S, E), 3, np.float64)},
    "mask": {bool: _mask, np.int64: _mask.astype(np.int64), np.int32: _mask.astype(np.int32),
             np.float32: np.where(_mask, normal((B, H, T, S), 4), -np.inf).astype(np.float32),
             np.float64: np.where(_mask, normal((B, H, T, S), 4, np.float64), -np.inf)},
    "key_mask": {bool: random_bool((B, S), 6, p=0.8), np.int64: random_bool((B, S), 6, p=0.8).astype(np.int64),
                 np.uint16: random_bool((B, S), 6, p=0.8).astype(np.uint16)},
    "head_mask": {np.float32: normal((B, H), 7), np.float64: normal((H,), 7, np.float64)},
}
_CASES = [(arg, dt) for arg, bases in _BASES.items() for dt in bases]


@pytest.mark.parametrize("make", ["mha_mlx", "mha"])
@pytest.mark.parametrize("arg,dt", _CASES, ids=[f"{a}-{np.dtype(d).name}" for a, d in _CASES])
def test_any_layout_and_byte_order_gives_the_contiguous_native_result(make, arg, dt):
    """Reversed views raised ValueError (DLPack negative strides) and big-endian arrays
    RuntimeError (std::bad_cast); each now gives, bit for bit, what its contiguous native copy gives."""
    w = random_weights(E, H, seed=0)
    if make == "mha_mlx":
        layer = mha_mlx.MultiHeadAttention(E, H, weights=w)
    else:
        layer = mha.MultiHeadAttention.from_weights(w, backend="mlx")
    args = {n: bases[np.float32 if np.float32 in bases else bool] for n, bases in _BASES.items()}
    base = _BASES[arg][dt]
    for name, view in layouts(base):
        assert np.array_equal(view, base)
        native = np.ascontiguousarray(view, dtype=view.dtype.newbyteorder("="))
        got = mha.to_numpy(layer(**{**args, arg: view}, causal=True))
        want = mha.to_numpy(layer(**{**args, arg: native}, causal=True))
        assert got.dtype == np.float32 and np.array_equal(got, want, equal_nan=True), f"{arg} {view.dtype} {name}"


def test_float64_input_is_the_float32_input():
    layer = mha.MultiHeadAttention.from_weights(random_weights(E, H, seed=0), backend="mlx")
    x = normal((B, T, E), 1, np.float64)
    for view in (x, x[:, ::-1], x.astype(">f8")):
        got = mha.to_numpy(layer(view))
        assert got.dtype == np.float32
        assert np.array_equal(got, mha.to_numpy(layer(np.ascontiguousarray(view, dtype=np.float32))))


# -- mha_mlx.fused_attention, the public kernel on heads ---------------------------------------------

def _heads_reference(q, k, v, scale, keep, bias):
    """float64 softmax(q k^T s + bias) v on (B, H, T, D) heads, GQA by repeating k and v; rows without a
    visible key give 0 (the project's empty-row rule on heads: zero context)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale + (0.0 if bias is None else bias)
    s = np.where(keep, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    z = e.sum(axis=-1, keepdims=True)
    P = e / np.where(z == 0, 1.0, z)
    return P @ v, P


@pytest.mark.parametrize("over_budget", [False, True], ids=["fused", "blockwise"])
@pytest.mark.parametrize("as_numpy", [False, True], ids=["mx masks", "numpy masks"])
def test_fused_attention_against_float64(as_numpy, over_budget):
    """q (2, 4, 5, 6), k/v (2, 2, 7, 6) (GQA): a bool mask, an additive one with finfo.min, -1e9 and -inf,
    key_mask, causal (T < S, aligned at the end), one row that sees nothing; masks given as mx arrays or
    as numpy arrays (which it once refused with MLX's compile error); within the score budget (the fused
    kernel) and over it (score_bytes=0: the core's blockwise path, as the layer takes on a CPU)."""
    rng = np.random.default_rng(3)
    B, H, Hkv, T, S, D = 2, 4, 2, 5, 7, 6
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    keep = rng.random((B, 1, T, S)) < 0.7
    keep[1, 0, 2] = False  # a row that sees nothing
    bias = np.where(rng.random((1, H, T, S)) < 0.2, np.finfo(np.float32).min, rng.standard_normal((1, H, T, S)))
    bias = np.where(rng.random((1, H, T, S)) < 0.15, -1e9, bias)
    bias = np.where(rng.random((1, H, T, S)) < 0.1, -np.inf, bias).astype(np.float32)
    km = rng.random((B, S)) < 0.8
    causal = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
    wrap = (lambda a: a) if as_numpy else mx.array
    cases = [({}, np.ones((1, 1, T, S), bool), None), ({"mask": keep}, keep, None),
             ({"mask": bias}, np.isfinite(bias), np.where(np.isfinite(bias), bias, 0.0)),
             ({"key_mask": km, "causal": True}, km[:, None, None, :] & causal, None),
             ({"mask": keep, "key_mask": km, "causal": True}, keep & km[:, None, None, :] & causal, None)]
    for kw, visible, add in cases:
        with mha_mlx.options.override(score_bytes=0 if over_budget else mha_mlx.options.score_bytes):
            got = np.array(mha_mlx.fused_attention(mx.array(q), mx.array(k), mx.array(v), scale=0.4,
                                                   **{n: wrap(a) if isinstance(a, np.ndarray) else a
                                                      for n, a in kw.items()}))
        want, P = _heads_reference(q, k, v, 0.4, visible, add)
        # a logit's rounding: u (s |q| |k| + sum_j p_j |A_j|, the row's own mask term), times 2 max|v|, and
        # the sum; per row (B, H, T, 1)
        term = tolerance.mask_term(None if add is None else add, None if add is None else P)
        tol = 8 * 2**-24 * np.abs(v).max() * (1 + 0.4 * np.linalg.norm(q, axis=-1).max()
                                               * np.linalg.norm(k, axis=-1).max() + term)
        tolerance.assert_close(got, want, tol, str(sorted(kw)))
