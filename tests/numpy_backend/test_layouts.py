"""The numpy backend given inputs in the layouts and byte orders users send (reversed, transposed,
strided views, Fortran order, big-endian): each gives, bit for bit, what its contiguous native copy
gives, on every route a call can take (the split by head groups and by rows, a decode step, the checked
route with a cache). test_mlx_robust holds the MLX backend to the same."""

from __future__ import annotations

import numpy as np
import pytest

import mha

from tests.helpers import layouts, normal, random_bool, random_weights

B, T, S, E, H = 2, 5, 7, 12, 3
_mask = random_bool((B, H, T, S), 5, p=0.7)
_BASES = {
    "query": {np.float32: normal((B, T, E), 1), np.float64: normal((B, T, E), 1, np.float64),
              np.float16: normal((B, T, E), 1, np.float16)},
    "key": {np.float32: normal((B, S, E), 2)},
    "value": {np.float32: normal((B, S, E), 3)},
    "mask": {bool: _mask, np.int64: _mask.astype(np.int64),
             np.float32: np.where(_mask, normal((B, H, T, S), 4), np.finfo(np.float32).min).astype(np.float32)},
    "key_mask": {bool: random_bool((B, S), 6, p=0.8)},
    "head_mask": {np.float32: normal((B, H), 7)},
}
_CASES = [(arg, dt) for arg, bases in _BASES.items() for dt in bases]


def _same(got, want, what):
    got, want = mha.to_numpy(got), mha.to_numpy(want)
    assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), what


@pytest.mark.parametrize("arg,dt", _CASES, ids=[f"{a}-{np.dtype(d).name}" for a, d in _CASES])
def test_cross_attention_inputs_in_any_layout(arg, dt):
    layer = mha.MultiHeadAttention.from_weights(random_weights(E, H, seed=0), backend="numpy")
    args = {n: bases[np.float32 if np.float32 in bases else bool] for n, bases in _BASES.items()}
    for name, view in layouts(_BASES[arg][dt]):
        native = np.ascontiguousarray(view, dtype=view.dtype.newbyteorder("="))
        _same(layer(**{**args, arg: view}, causal=True), layer(**{**args, arg: native}, causal=True),
              f"{arg} {view.dtype} {name}")


@pytest.mark.parametrize("shape", [(1, 9, 24), (3, 1, 24), (2, 6, 24)])
@pytest.mark.parametrize("threads", [1, 3])
def test_self_attention_inputs_in_any_layout(shape, threads):
    """A (1, T, E) input in Fortran order is a Fortran-ordered (T, E) matrix per batch element, and a
    (B, 1, E) one reshapes to a Fortran-ordered (B, E) view: BLAS takes either as a transposed operand."""
    import mha_cpu

    layer = mha.MultiHeadAttention(24, 4, num_kv_heads=2, backend="numpy", seed=1)
    x = normal(shape, 8)
    with mha_cpu.options.override(threads=threads, parallel_flops=0.0):
        want = layer(x, causal=True)
        for name, view in layouts(x):
            _same(layer(view, causal=True), want, f"{shape} {threads} threads, {name}")
            # the same array given as query, key and value is still self-attention once it is converted
            # (a copy per argument took the cross-attention route: other roundings)
            _same(layer(view, view, view, causal=True), want, f"{shape} {threads} threads, {name}, passed three times")


@pytest.mark.parametrize("checked", [False, True], ids=["lane", "checked route"])
def test_decode_tokens_in_any_layout(checked):
    """Decoding token by token (B=3): the decode lane, and the checked route (check_finite=True), give
    for tokens in every layout the bits of the C-ordered tokens (a Fortran-ordered (3, 1, E) token did
    not: 6e-7 apart)."""
    layer = mha.MultiHeadAttention(60, 6, num_kv_heads=2, backend="numpy", seed=0)
    x = normal((3, 6, 60), 9)
    kw = {"check_finite": True} if checked else {}

    def decode(make):
        cache = layer.init_cache(3)
        return np.concatenate([layer(make(x[:, t:t + 1]), cache=cache, causal=True, **kw) for t in range(6)], 1)

    want = decode(np.ascontiguousarray)
    for i, (name, _) in enumerate(layouts(x[:, :1])):
        _same(decode(lambda a: layouts(a)[i][1]), want, f"token {name}")


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_one_array_passed_three_times_is_self_attention(backend):
    """Self-attention is told by identity (key is query, value is key). Converting each argument on its
    own (a C-ordered copy here, an mx.array on MLX) made three arrays of one: the call then took the
    cross-attention route (three projections, other roundings), and a causal prefix of a Fortran-ordered
    input was no longer bitwise its own (the property suite caught it)."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from mha._prepare import prepare

    layer = mha.MultiHeadAttention(24, 4, num_kv_heads=2, backend=backend, seed=1)
    x = normal((2, 5, 24), 10)
    kw = dict(mask=None, key_mask=None, causal=True, head_mask=None, return_weights=False, training=False,
              check_finite=False, return_lse=False, cache=None)
    for name, view in layouts(x) + [("contiguous", x)]:
        assert prepare(layer, view, view, view, **kw).self_attention, name
        assert prepare(layer, view, None, None, **kw).self_attention, name
        assert not prepare(layer, view, view.copy(), None, **kw).self_attention, name
