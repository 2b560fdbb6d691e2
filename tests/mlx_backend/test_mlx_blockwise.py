"""The MLX backend's blockwise path (mha_mlx._blockwise), taken when the score matrix would exceed
``mha_mlx.options.score_bytes``: the project's semantics with any block sizes (forced here on small
problems so that every branch runs), and long sequences in bounded memory (a subprocess under a cap)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mha
from mha.testing import oracle, run_property, tolerance
from mha.testing import strategies as mst
from mha.testing.adapters import BackendAdapter
from mha.testing.properties import PROPERTIES
from tests.helpers import normal, random_bool, random_weights

mx = pytest.importorskip("mlx.core")
import mha_mlx  # noqa: E402
from mha._masks import MaskSet  # noqa: E402
from mha_mlx import _blockwise  # noqa: E402

FEATURES = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "gqa", "rope",
                      "window"})


def blocks(bq, bk):
    """Every call blockwise, with bq queries and bk keys per block."""
    return mha_mlx.small_blocks(bq, bk)


def fused():
    """Never blockwise (with return_lse: the reference path)."""
    return mha_mlx.options.override(score_bytes=None)


@given(p=mst.problems(FEATURES, positional=True), bq=st.integers(1, 5), bk=st.integers(1, 5), hm=st.booleans())
def test_any_blocks_equal_the_reference(p, bq, bk, hm):
    """Output and log-sum-exp against the reference path (mha._reference on MLX): masks of every kind
    (AND), causal aligned at the end, windows, RoPE, GQA, head_mask, cross-attention; blocks of 1-5."""
    layer = mha.MultiHeadAttention.from_weights(p.weights, backend="mlx", **p.layer_options())
    k, v = p.kv
    kw = dict(p.masks(), head_mask=normal((p.config.H,), p.seed % 997) if hm else None)
    with fused():
        y_ref, lse_ref = (mha.to_numpy(a) for a in layer(p.query, k, v, return_lse=True, **kw))
    with blocks(bq, bk):
        y, lse = (mha.to_numpy(a) for a in layer(p.query, k, v, return_lse=True, **kw))
        y_plain = mha.to_numpy(layer(p.query, k, v, **kw))
    M = tolerance.magnitude(p.weights, p.query, k, v, y_ref=y_ref, mask=p.mask, head_mask=kw["head_mask"],
                            max_angle=p.max_angle())
    tolerance.assert_close(y, y_ref, tolerance.t2("float32", "float32", M), f"blocks ({bq}, {bk})")
    assert np.array_equal(y, y_plain), "asking for lse changed the output"
    finite = np.isfinite(lse_ref)
    assert np.array_equal(np.isfinite(lse), finite) and np.all(lse[~finite] == -np.inf)
    M_lse = tolerance.weights_magnitude(p.weights, p.query, k, mask=p.mask, max_angle=p.max_angle())
    tolerance.assert_close(lse[finite], lse_ref[finite], tolerance.t2("float32", "float32", M_lse), "lse")


def _nan_case(kind):
    """Layer, inputs and mask arguments for the non-finite tests: B=2, T=5, S=7, H=4, Hkv=2."""
    B, T, S, E, H = 2, 5, 7, 12, 4
    layer = mha.MultiHeadAttention.from_weights(random_weights(E, H, Hkv=2, seed=1), backend="mlx",
                                                window=3 if kind == "window" else None)
    mask = random_bool((B, H, T, S), 8, p=0.5)
    mask[0, :, 1::2, 3], mask[0, 2, 0, 3] = False, True  # key 3: hidden from queries 1, 3, seen by query 0
    kw = {"causal": dict(causal=True), "none": {}, "window": {},
          "key_mask": dict(key_mask=np.array([[1, 1, 1, 0, 1, 1, 1], [1] * 7], bool)), "mask": dict(mask=mask)}[kind]
    return layer, normal((B, T, E), 2), normal((B, S, E), 3), normal((B, S, E), 4), kw


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("kind", ["none", "causal", "key_mask", "mask", "window"])
def test_a_nonfinite_key_reaches_exactly_the_rows_that_see_it(bad, where, kind):
    """NaN/inf at key 3 of batch element 0: the rows that see it (in any head) are NaN, every other row
    is bit for bit what it is when that key holds large finite junk instead; lse as the reference's."""
    layer, x, key, value, kw = _nan_case(kind)
    j = 3
    poisoned, junk = {"key": key.copy(), "value": value.copy()}, {"key": key.copy(), "value": value.copy()}
    poisoned[where][0, j, 1] = bad
    junk[where][0, j] = normal((12,), 9, sigma=30.0)
    with blocks(2, 3):
        y_bad, lse = (mha.to_numpy(a) for a in layer(x, poisoned["key"], poisoned["value"], return_lse=True, **kw))
        y_junk = mha.to_numpy(layer(x, junk["key"], junk["value"], **kw))
    with fused():  # the reference path: lse of the logits as they are (NaN only from a NaN/inf key)
        lse_ref = mha.to_numpy(layer(x, poisoned["key"], poisoned["value"], return_lse=True, **kw)[1])
    assert np.array_equal(np.isnan(lse), np.isnan(lse_ref)) and np.array_equal(lse == np.inf, lse_ref == np.inf)
    finite = np.isfinite(lse_ref)
    M = tolerance.weights_magnitude(layer.weights, x, key, mask=kw.get("mask"))  # the rows that see no bad key
    tolerance.assert_close(lse[finite], lse_ref[finite], tolerance.t2("float32", "float32", M), "lse")
    B, T, E = x.shape
    vis = oracle.visible_keys(B, 4, T, 7, mask=kw.get("mask"), key_mask=kw.get("key_mask"),
                              causal=kw.get("causal", False), window=layer.window)
    sees = vis[:, :, :, j].any(axis=1)  # (B, T)
    sees[1] = False  # the bad key is in batch element 0 only
    if kind in ("causal", "mask", "window"):
        assert sees.any() and (~sees[0]).any(), "the case must have rows on both sides"
    assert np.isnan(y_bad[sees]).all()
    assert np.array_equal(y_bad[~sees], y_junk[~sees]) and np.isfinite(y_bad[~sees]).all()


@pytest.mark.parametrize("case", ["causal T > S", "key_mask all False", "window", "mask rows"])
def test_rows_without_a_visible_key_give_the_output_bias(case):
    B, E, H = 2, 12, 3
    T, S = {"causal T > S": (7, 4), "window": (9, 3)}.get(case, (5, 6))
    w = random_weights(E, H, seed=2)
    layer = mha.MultiHeadAttention.from_weights(w, backend="mlx", window=2 if case == "window" else None)
    empty = np.zeros((B, T), bool)
    if case == "causal T > S":
        kw = dict(causal=True)
        empty[:, :T - S] = True
    elif case == "key_mask all False":
        kw = dict(key_mask=np.array([[1, 0, 1, 1, 0, 1], [0] * 6], bool))
        empty[1] = True
    elif case == "window":  # |i + S - T - j| < 2 leaves queries 0..4 with no key
        kw = {}
        empty[:, :5] = True
    else:
        m = random_bool((B, 1, T, S), 3, p=0.7)
        m[0, :, 2], m[1, :, 4] = False, False
        empty[0, 2] = empty[1, 4] = True
        kw = dict(mask=m)
    with blocks(2, 2):
        y, lse = (mha.to_numpy(a) for a in layer(normal((B, T, E), 1), normal((B, S, E), 2), return_lse=True,
                                                 head_mask=normal((H,), 3), **kw))
    assert np.array_equal(y[empty], np.broadcast_to(w.o_bias, y[empty].shape))
    assert np.all(lse.transpose(0, 2, 1)[empty] == -np.inf) and np.isfinite(lse.transpose(0, 2, 1)[~empty]).all()
    assert np.isfinite(y).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("regime", ["large logits", "many keys"])
def test_half_precision_accumulates_in_float32(dtype, regime):
    """Logits beyond float16's range (65504) and 600-key sums: the result is the float64 one rounded once
    to the dtype, as float32 accumulation gives (float16 arithmetic overflows or drifts by ~1e-3)."""
    rng = np.random.default_rng(0)
    B, H, T, S, D = 1, 2, 5, 600, 8
    sigma = 150.0 if regime == "large logits" else 1.0
    dt = getattr(mx, dtype)
    q, k, v = (mx.array(rng.normal(size=(B, H, n, D)) * s).astype(dt) for n, s in ((T, sigma), (S, sigma), (S, 1.0)))
    scale = D**-0.5
    with mha_mlx.options.override(block_q=2, block_k=128):
        ctx, lse = _blockwise.attention(q, k, v, scale=scale, masks=MaskSet.aligned(T, S),
                                        return_lse=True)
    assert ctx.dtype == dt and lse.dtype == mx.float32 and ctx.shape == (B, T, H, D)
    q64, k64, v64 = (np.array(a.astype(mx.float32), np.float64) for a in (q, k, v))
    z = scale * q64 @ k64.swapaxes(-1, -2)  # (B, H, T, S)
    p = np.exp(z - z.max(-1, keepdims=True))
    want = ((p / p.sum(-1, keepdims=True)) @ v64).swapaxes(1, 2)  # (B, T, H, D)
    got = np.array(ctx.astype(mx.float32), np.float64)
    u = tolerance.unit_roundoff(dtype)
    bound = u * np.abs(want) + 64 * tolerance.unit_roundoff("float32") * np.abs(v64).max()
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))


@pytest.mark.parametrize("window", [None, 3])
def test_decoding_with_a_cache_runs_blockwise_too(window):
    w = random_weights(12, 4, Hkv=2, seed=5)
    layer = mha.MultiHeadAttention.from_weights(w, backend="mlx", window=window, rope=True)
    x = normal((2, 9, 12), 6)
    outs = {}
    for name, ctx in (("fused", fused()), ("blocks", blocks(2, 3))):
        cache = layer.init_cache(2, 9)
        with ctx:
            outs[name] = np.concatenate([mha.to_numpy(layer(x[:, a:b], cache=cache, causal=True))
                                         for a, b in ((0, 4), (4, 5), (5, 6), (6, 8), (8, 9))], axis=1)
    M = tolerance.magnitude(w, x, y_ref=outs["fused"], max_angle=9 * layer.rope.scale)
    tolerance.assert_close(outs["blocks"], outs["fused"], tolerance.t2("float32", "float32", M), "decoding")


def test_the_switch_is_at_the_budget(monkeypatch):
    """Blockwise exactly when 4 * B * H * T * S bytes exceed score_bytes, also for lse (which the fused
    kernel does not give); weights always take the reference; a small call by default takes the fused
    kernel."""
    seen = []
    real = _blockwise.attention
    monkeypatch.setattr(_blockwise, "attention", lambda *a, **k: seen.append(1) or real(*a, **k))
    layer = mha.MultiHeadAttention.from_weights(random_weights(12, 3, seed=0), backend="mlx")
    x, kv = normal((2, 5, 12), 1), normal((2, 7, 12), 2)
    n = 4 * 2 * 3 * 5 * 7
    for budget, runs in ((n - 1, 2), (n, 0), (None, 0), (0, 2)):
        seen.clear()
        with mha_mlx.options.override(score_bytes=budget):
            layer(x, kv)
            layer(x, kv, return_weights=True)
            layer(x, kv, return_lse=True, return_weights=True)
            lse = layer(x, kv, return_lse=True)[1]
        assert len(seen) == runs and lse.shape == (2, 3, 5), budget
    seen.clear()
    layer(x, kv, return_lse=True)
    assert not seen and mha_mlx.options.score_bytes == 256 << 20


@pytest.mark.parametrize("field,value,error,expected", [
    ("score_bytes", -1, ValueError, "an int >= 0 or None, got -1"),
    ("score_bytes", 1.5, TypeError, "an int >= 0 or None, got 1.5 \\(float\\)"),
    ("score_bytes", True, TypeError, "an int >= 0 or None, got True \\(bool\\)"),
    ("gpu", 1, TypeError, "True or False, got 1 \\(int\\)"),
    ("block_q", 0, ValueError, "an int >= 1 or None, got 0"),
    ("block_k", "8", TypeError, "an int >= 1 or None, got '8' \\(str\\)")])
def test_bad_options_are_refused_on_assignment(field, value, error, expected):
    before = repr(mha_mlx.options)
    with pytest.raises(error, match=rf"mha_mlx\.options\.{field} must be {expected}"):
        setattr(mha_mlx.options, field, value)
    with pytest.raises(AttributeError, match="mha_mlx.options has no setting 'block_size'; the settings are "
                                             "score_bytes, gpu, block_q, block_k"):
        mha_mlx.options.block_size = 8
    with pytest.raises(ValueError, match="block_q must be an int >= 1"):
        mha_mlx.small_blocks(0, 3)
    assert repr(mha_mlx.options) == before


_LONG = r'''
import json, resource, sys
import numpy as np, mlx.core as mx
import mha, mha_mlx
T, path = int(sys.argv[1]), sys.argv[2]
if path == "fused":
    mha_mlx.options.score_bytes = None
layer = mha.MultiHeadAttention(8, 1, backend="mlx", seed=0)
mx.eval(layer(np.ones((1, 64, 8), np.float32)))  # warm: MLX's threads and pools exist now
size = int(dict(s.split(":", 1) for s in open("/proc/self/status"))["VmSize"].split()[0]) << 10
cap = size + (256 << 20)  # 256 MiB more address space: not enough for the 400 MB score matrix
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
x = np.random.default_rng(0).standard_normal((1, T, 8)).astype(np.float32)
mx.reset_peak_memory()
y = mha.to_numpy(layer(x))
print(json.dumps({"rows": y[0, [0, 1, T // 2, T - 1]].tolist(), "peak": mx.get_peak_memory()}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_a_long_sequence_runs_in_bounded_memory():
    """T = S = 10,000, H = 1: the fused kernel's 400 MB score matrix does not fit 256 MiB more address
    space (that run dies), the default settings run blockwise within it, MLX's peak under 64 MiB;
    rows checked against the numpy backend."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    T = 10_000

    def run(path):
        return subprocess.run([sys.executable, "-c", _LONG, str(T), path], cwd=root, capture_output=True,
                              text=True, timeout=300)

    control = run("fused")
    assert control.returncode != 0 and "rows" not in control.stdout, "the cap must be too small for the old path"
    res = run("default")
    assert res.returncode == 0, res.stderr[-800:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # 10 MiB measured; left lazy, MLX computes many blocks' logits before it consumes them: 200
    assert out["peak"] < 64 << 20, f"MLX peak {out['peak'] / 2**20:.0f} MiB"
    got = np.array(out["rows"])
    x = np.random.default_rng(0).standard_normal((1, T, 8)).astype(np.float32)
    ref = mha.MultiHeadAttention(8, 1, backend="numpy", seed=0)
    for r, i in enumerate((0, 1, T // 2, T - 1)):
        want = ref(x[:, i:i + 1], x)[0, 0]
        M = tolerance.magnitude(ref.weights, x[:, i:i + 1], x, y_ref=want)
        tolerance.assert_close(got[r], want, tolerance.t2("float32", "float32", M), f"row {i}")



def test_blockwise_under_compile_and_grad(monkeypatch):
    """The running state is evaluated block by block where MLX allows it; inside mx.compile it stays
    lazy (and agrees with the fused path), and gradients through the evaluated blocks are those of the
    lazy graph, bit for bit."""
    import mlx.nn as nn

    w = random_weights(12, 3, seed=4)
    layer = mha.MultiHeadAttention.from_weights(w, backend="mlx")
    x = mx.array(normal((2, 7, 12), 5))

    def grads():
        g = nn.value_and_grad(layer, lambda m, x: (m(x, causal=True) ** 2).sum())(layer, x)[1]
        return [np.array(g[n]["weight"]) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]

    with fused():
        want = mha.to_numpy(layer(x, causal=True))
    with blocks(2, 3):
        got = mha.to_numpy(mx.compile(lambda x: layer(x, causal=True))(x))
        evaluated = grads()
        monkeypatch.setattr(_blockwise, "_evaluate", lambda *arrays: None)
        lazy = grads()
    M = tolerance.magnitude(w, np.array(x), y_ref=want)
    tolerance.assert_close(got, want, tolerance.t2("float32", "float32", M), "compiled")
    for a, b in zip(evaluated, lazy):
        assert np.isfinite(a).all() and np.abs(a).max() > 0 and np.array_equal(a, b)



@pytest.mark.parametrize("name", list(PROPERTIES))
def test_property_on_the_blockwise_path(name):
    """The property suite on the MLX backend with every call blockwise in 2 x 3 blocks (20 examples
    each; test_any_blocks_equal_the_reference draws many more against the reference)."""
    adapter = BackendAdapter("mlx", blocks=(2, 3))
    reason = PROPERTIES[name].not_applicable(adapter.features, {}, adapter.dtypes)
    if reason:  # float64_range: MLX has no float64
        pytest.skip(f"n/a: {reason}")
    run_property(adapter, name, max_examples=20)


def test_long_sequence_benchmark_script_runs(tmp_path):
    """benchmarks/mlx_long.py at tiny sizes: every path in its own process (and a run that dies under its
    cap reported as such), the paired mode, the JSON written."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "mlx_long.py")
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, script, "--T", "40", "--json", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["T"], r["path"]) for r in rows] == [(40, "fused"), (40, "blockwise"), (40, "numpy")]
    assert all(r["finite"] and r["seconds"] > 0 for r in rows)
    if sys.platform.startswith("linux"):
        dead = subprocess.run([sys.executable, script, "--T", "40", "--paths", "fused", "--cap-gib", "0.01"],
                              capture_output=True, text=True, timeout=300)
        assert dead.returncode == 0 and "fused: failed, exit status" in dead.stdout
    paired = subprocess.run([sys.executable, script, "--paired", "30", "50", "--rounds", "2"], capture_output=True,
                            text=True, timeout=300)
    assert paired.returncode == 0 and paired.stdout.count("ratio") == 2, paired.stderr[-2000:]
