"""Every argument error: the right exception type, a message naming the argument, what came and what
was expected, raised before any arithmetic (the compute functions are replaced by tripwires)."""

from __future__ import annotations

import numpy as np
import pytest

import mha
import mha._layer

from tests.helpers import normal

E, H = 12, 4


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(embed_dim=12.0), TypeError, r"embed_dim must be a positive int, got 12\.0 \(float\)"),
    (dict(embed_dim=0), ValueError, r"embed_dim must be a positive int, got 0"),
    (dict(embed_dim=True), TypeError, r"embed_dim must be a positive int, got True \(bool\)"),
    (dict(num_heads=-2), ValueError, r"num_heads must be a positive int, got -2"),
    (dict(embed_dim=10, num_heads=3), ValueError,
     r"embed_dim=10 is not divisible by num_heads=3: embed_dim must equal num_heads \* head_dim"),
    (dict(num_kv_heads=3), ValueError, r"num_heads=4 is not divisible by num_kv_heads=3"),
    (dict(num_kv_heads=0), ValueError, r"num_kv_heads must be a positive int, got 0"),
    (dict(kdim="7"), TypeError, r"kdim must be a positive int, got '7' \(str\)"),
    (dict(vdim=0), ValueError, r"vdim must be a positive int, got 0"),
    (dict(bias=1), TypeError, r"bias must be True or False, got 1 \(int\)"),
    (dict(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    (dict(scale="0.5"), TypeError, r"scale must be a finite float or None, got '0\.5' \(str\)"),
    (dict(scale=-1e39), ValueError, r"scale must lie within float32's range \(\|scale\| <= 3\.402823e\+38\) for a "
                                    r"float32 layer, got -1e\+39"),
    (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1\.0"),
    (dict(dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0\.1"),
    (dict(dtype="int8"), ValueError, r"dtype must be one of float32, float64, float16, bfloat16, got 'int8'"),
    (dict(seed=-1), ValueError, r"seed must be a non-negative int below 2\*\*63 or None, got -1"),
    (dict(seed=2**64), ValueError, r"seed must be a non-negative int below 2\*\*63 or None, got 18446744073709551616"),
    (dict(seed=1.0), TypeError, r"seed must be a non-negative int or None, got 1.0 \(float\)"),
    (dict(weights=np.zeros(3)), TypeError, r"weights must be an mha.AttentionWeights or a path, got ndarray"),
])
def test_constructor_errors(backend, kwargs, exc, msg):
    args = dict(embed_dim=E, num_heads=H)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        mha.MultiHeadAttention(args.pop("embed_dim"), args.pop("num_heads"), backend=backend, **args)


def test_scale_past_float32_takes_a_float64_layer():
    """1e39 is inf in float32 (every logit inf or NaN): refused for float32 layers, taken by float64 ones;
    a scale near float32's largest with weights of a few units builds (the numpy backend's fold once
    multiplied them in float32 and raised OverflowError)."""
    layer = mha.MultiHeadAttention(E, H, backend="numpy", dtype="float64", scale=1e39, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, E)) * 1e-39
    assert np.isfinite(layer(x)).all()
    w = mha.AttentionWeights.init(E, H, seed=0)
    d = w.to_dict()
    d["q_weight"] = d["q_weight"] * 8
    big = mha.MultiHeadAttention.from_weights(mha.AttentionWeights(**d, num_heads=H), backend="numpy", scale=1e38)
    y = big(np.random.default_rng(1).standard_normal((1, 3, E)).astype(np.float32) * 1e-38)
    assert np.isfinite(y).all()


def test_dtype_not_supported_by_backend():
    with pytest.raises(ValueError, match=r"dtype='float16' is not supported by the numpy backend; use one of "
                                         r"float32, float64 \(float16/bfloat16 need backend='mlx'\)"):
        mha.MultiHeadAttention(E, H, backend="numpy", dtype="float16")
    pytest.importorskip("mlx.core")
    with pytest.raises(ValueError, match=r"dtype='float64' is not supported by the mlx backend"):
        mha.MultiHeadAttention(E, H, backend="mlx", dtype=np.float64)


@pytest.fixture
def tripwired(backend, monkeypatch):
    """A layer whose every compute path raises AssertionError: validation must come first."""
    layer = mha.MultiHeadAttention(E, H, num_kv_heads=2, kdim=7, vdim=5, backend=backend, seed=0)

    def tripwire(*a, **k):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(mha._layer, "multi_head_attention", tripwire)
    monkeypatch.setattr(type(layer), "_forward", tripwire)
    return layer


Q = normal((2, 3, E), 0)
K = normal((2, 6, 7), 1)
V = normal((2, 6, 5), 2)


@pytest.mark.parametrize("args,kwargs,exc,msg", [
    ((Q[0, 0], K, V), {}, ValueError, r"query must have shape \(B, L, E\) or unbatched \(L, E\), got shape \(12,\)"),
    ((Q[..., :5], K, V), {}, ValueError, r"query has last dimension 5, expected E=12 \(got shape \(2, 3, 5\)\)"),
    ((Q, K[..., :4], V), {}, ValueError, r"key has last dimension 4, expected kdim=7"),
    ((Q, K, V[..., :2]), {}, ValueError, r"value has last dimension 2, expected vdim=5"),
    ((Q > 0, K, V), {}, TypeError, r"query must hold real numbers, got dtype bool"),
    ((Q.astype(np.complex64), K, V), {}, TypeError, r"query must hold real numbers, got dtype complex64"),
    ((np.array([["a"]]), K, V), {}, TypeError, r"query must hold real numbers, got dtype <U1"),
    ((Q, K[:1], V[:1]), {}, ValueError, r"query, key and value must share the batch size B, got 2, 1, 1"),
    ((Q, K, V[:, :4]), {}, ValueError, r"key and value must have the same length S, got key shape \(2, 6, 7\) "
                                       r"and value shape \(2, 4, 5\)"),
    ((Q[0], K, V), {}, ValueError, r"query, key and value must all be batched \(3-D\) or all unbatched \(2-D\)"),
    ((Q,), {}, TypeError, r"key is required: kdim=7 differs from embed_dim=12"),
    ((Q, None, V), {}, TypeError, r"value was given without key"),
    ((Q, K), {}, TypeError, r"value is required: vdim=5 differs from kdim=7"),
    ((Q, K, V), dict(mask=np.ones((2, 4, 3, 5), bool)), ValueError,
     r"mask of shape \(2, 4, 3, 5\) does not broadcast to \(B, H, T, S\) = \(2, 4, 3, 6\)"),
    ((Q, K, V), dict(mask=np.ones((8, 3, 6), bool)), ValueError,
     r"looks like torch's \(B\*num_heads, T, S\) layout: reshape it to \(2, 4, 3, 6\)"),
    ((Q, K, V), dict(mask=np.ones((1, 2, 4, 3, 6), bool)), ValueError, r"mask of shape \(1, 2, 4, 3, 6\) does not"),
    ((Q, K, V), dict(mask=np.ones((2, 3, 6), bool)), ValueError,
     r"mask of shape \(2, 3, 6\) is ambiguous: a 3-D mask could be \(B, T, S\) or \(H, T, S\); give it 4 "
     r"dimensions, mask\[:, None\] for one mask per batch element \(B, 1, T, S\) or mask\[None\] for one per head"),
    ((Q, K, V), dict(mask=np.zeros((4, 3, 6), np.float32)), ValueError, r"mask of shape \(4, 3, 6\) is ambiguous"),
    ((Q, K, V), dict(mask=np.ones((3, 6), np.complex64)), TypeError,
     r"mask must be bool \(True = may attend\), int 0/1 or float \(added to the logits\), got dtype complex64"),
    ((Q, K, V), dict(mask=np.full((3, 6), 2)), ValueError, r"mask is an integer mask and must hold only 0 and 1"),
    ((Q, K, V), dict(mask=np.full((3, 6), np.nan)), ValueError,
     r"mask is an additive float mask and must not hold NaN or \+inf"),
    ((Q, K, V), dict(mask=np.full((3, 6), np.inf)), ValueError, r"must not hold NaN or \+inf"),
    ((Q, K, V), dict(key_mask=np.ones((2, 5), bool)), ValueError,
     r"key_mask must have shape \(B, S\) = \(2, 6\), got \(2, 5\)"),
    ((Q, K, V), dict(key_mask=np.ones((2, 6), np.float32)), TypeError,
     r"key_mask must be bool \(True = real key, False = padding\) or int 0/1, got dtype float32"),
    ((Q, K, V), dict(key_mask=np.full((2, 6), 3)), ValueError, r"key_mask is an integer mask and must hold only 0 and 1"),
    ((Q, K, V), dict(head_mask=np.ones(3)), ValueError,
     r"head_mask must have shape \(H,\) = \(4,\) or \(B, H\) = \(2, 4\), got \(3,\)"),
    ((Q, K, V), dict(causal="yes"), TypeError, r"causal must be True or False, got 'yes' \(str\)"),
    (([[0.0] * E, [0.0] * (E - 1)], K[0], V[0]), {}, ValueError,
     r"query must be an array of numbers with a regular shape \(B, L, E\) or \(L, E\): setting an array"),
    ((Q, [K[0].tolist(), K[1, :5].tolist()], V), {}, ValueError, r"key must be an array of numbers with a regular"),
    ((Q, K, V), dict(return_weights=None), TypeError, r"return_weights must be True or False, got None"),
    ((Q, K, V), dict(training=1), TypeError, r"training must be True or False, got 1"),
])
def test_call_errors_come_before_any_work(tripwired, args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        tripwired(*args, **kwargs)


def test_check_finite(backend):
    layer = mha.MultiHeadAttention(E, H, backend=backend)
    x = normal((2, 3, E), 0)
    x[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match=r"query holds NaN or inf \(check_finite=True\)"):
        layer(x, check_finite=True)
    kv = normal((2, 5, E), 1)
    kv[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"key holds NaN or inf"):
        layer(normal((2, 3, E), 0), kv, check_finite=True)
    assert np.isnan(mha.to_numpy(layer(x))).any()  # default: propagate, no error


@pytest.mark.parametrize("name,value,exc,msg", [
    ("block_q", 0, ValueError, r"mha_cpu.options.block_q must be an int >= 1 or None, got 0 \(queries per task"),
    ("block_k", 0, ValueError, r"mha_cpu.options.block_k must be an int >= 1, got 0 \(keys per step"),
    ("block_k", None, TypeError, r"mha_cpu.options.block_k must be an int >= 1, got None \(NoneType\)"),
    ("threads", 2.0, TypeError, r"mha_cpu.options.threads must be an int >= 1 or None, got 2.0 \(float\)"),
    ("threads", True, TypeError, r"mha_cpu.options.threads must be an int >= 1 or None, got True \(bool\)"),
    ("parallel_flops", -1, ValueError, r"mha_cpu.options.parallel_flops must be a finite float >= 0, got -1"),
    ("blas_threads", 0, ValueError, r"mha_cpu.options.blas_threads must be an int >= 1 or None, got 0"),
    ("augment", False, AttributeError, r"mha_cpu.options has no setting 'augment'; the settings are threads, "
                                       r"block_q, block_k, parallel_flops, blas_threads"),
])
def test_numpy_options_are_checked_on_assignment(name, value, exc, msg):
    """A bad setting fails where it is set, naming it, not later inside a call (block_q = 0 used to fail
    as `range() arg 3 must not be zero` in the next call); the old value stays."""
    import mha_cpu

    before = mha_cpu.options.copy()
    with pytest.raises(exc, match=msg):
        setattr(mha_cpu.options, name, value)
    assert repr(mha_cpu.options) == repr(before)
