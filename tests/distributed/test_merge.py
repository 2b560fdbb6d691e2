"""The ring's arithmetic in one process (mha.distributed._merge), fast: a call's keys cut into uneven
blocks, each attended by the backend's core and merged, equal the whole call, on both backends; for
Hugging Face's padding masks (finfo.min, -1e9) the merge keeps each block's share of the keys, as the
one-process layer does; sinks count once. Then the same checks on mutants of the merge (realistic bugs,
one edit each with tests/mutation's AST editor): every one must fail them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import mha
from mha._masks import prepare
from mha.distributed import _merge
from mha.distributed._split import rank_spans
from tests.conftest import HAS_MLX
from tests.mutation import ast_edit

pytestmark = pytest.mark.skipif(not HAS_MLX, reason="mha.distributed needs MLX")

FMIN = float(np.finfo(np.float32).min)
B, H, Hkv, T, S, D = 2, 4, 2, 6, 11, 3
CUTS = [0, 2, 3, 9, 11]  # uneven blocks of keys: 2, 1, 6, 2


def _problem(fill, seed=0):
    """q, k, v (projected heads) and a causal MaskSet whose bias hides element 1's first 7 keys with
    ``fill`` (its rows 0..1 see only such keys: their keys fall in three blocks of different sizes);
    row 0 of element 0 sees no key at all (-inf everywhere)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    bias = np.zeros((B, 1, T, S), np.float32)
    bias[0, 0, 0] = -np.inf
    if fill is not None:
        bias[1, ..., :7] = fill
    masks = prepare(np, mask=bias, key_mask=None, causal=True, bias_dtype=np.float32, q_pos=range(S - T, S),
                    k_pos=range(S))
    return q, k, v, masks


def _merged(merge_mod, layer, xp, q, k, v, masks, order=None):
    """The blocks of CUTS attended one by one (in ``order``) and merged."""
    state = None
    blocks = list(zip(CUTS[:-1], CUTS[1:]))
    for i in order or range(len(blocks)):
        a, b = blocks[i]
        part = merge_mod.attend_block(layer, xp, q, k[:, :, a:b], v[:, :, a:b], masks.cut(cols=(a, b)), 0.5,
                                      _bound(xp, q))
        state = merge_mod.merge(xp, state, part)
    return state


def _bound(xp, q):
    return 0.5 * 8.0 * xp.sqrt(xp.sum(q * q, axis=-1, keepdims=True))  # |scale| |q_i| max|k| (|k| < 8 here)


def _layer(backend):
    return mha.MultiHeadAttention(H * D, H, num_kv_heads=Hkv, backend=backend, seed=0)


def check_merge(merge_mod, backend: str) -> None:
    """Merged blocks equal the whole call, for no mask, finfo.min and -1e9 padding, in any block order;
    with sinks merged once, the sink's share too."""
    layer = _layer(backend)
    xp = layer._xp
    for fill in (None, FMIN, -1e9):
        q, k, v, masks = _problem(fill)
        args = [a if xp is np else xp.array(a) for a in (q, k, v)]
        if xp is not np:
            bias = np.where(masks.keep, masks.bias, -np.inf).astype(np.float32)
            masks = prepare(xp, mask=xp.array(bias), key_mask=None, causal=True, bias_dtype=xp.float32,
                            q_pos=masks.q_pos, k_pos=masks.k_pos)
        ctx, lse = layer._attend(*args, masks, scale=0.5)[:2]  # the whole call: the layer's own core
        for order in (None, [3, 0, 2, 1]):
            st = _merged(merge_mod, layer, xp, *args, masks, order)
            np.testing.assert_allclose(np.array(st.ctx), np.array(ctx), rtol=1e-5, atol=2e-6,
                                       err_msg=f"{backend}, fill {fill}, order {order}: context")
            tot = np.array(st.total_lse(xp))
            ok = np.isfinite(np.array(lse))
            np.testing.assert_allclose(tot[ok], np.array(lse)[ok], rtol=1e-6, atol=1e-5, err_msg=f"fill {fill}: lse")
        sinks = xp.array(np.array([0.3, -1.0, 2.0, 0.5], np.float32)) if xp is not np else \
            np.array([0.3, -1.0, 2.0, 0.5], np.float32)
        whole = layer._attend(*args, masks, scale=0.5, sinks=sinks)[0]
        st = merge_mod.with_sinks(xp, _merged(merge_mod, layer, xp, *args, masks), sinks)
        np.testing.assert_allclose(np.array(st.ctx), np.array(whole), rtol=1e-5, atol=2e-6,
                                   err_msg=f"{backend}, fill {fill}: sinks once")


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_merged_blocks_equal_the_whole_call(backend):
    check_merge(_merge, backend)


def test_rows_whose_keys_all_carry_finfo_min_get_one_mean_not_one_per_block():
    """The issue's case in numbers: element 1's row 0 sees keys 0..5, all carrying finfo.min, cut into
    blocks of 2, 1 and 3 keys: the plain mean of the six values (as the one-process layer gives), where
    one mean per block weighed alike gave another."""
    layer = _layer("numpy")
    q, k, v, masks = _problem(FMIN)
    st = _merged(_merge, layer, np, q, k, v, masks)
    g = np.arange(H) // (H // Hkv)
    want = v[1][g][:, :6].mean(axis=1)  # (H, D): query 0 of element 1 sees keys 0..5
    np.testing.assert_allclose(st.ctx[1, :, 0], want, rtol=1e-6, atol=1e-7)


def test_rank_spans():
    assert rank_spans(10, 2) == [[(0, 5)], [(5, 10)]]
    assert rank_spans(10, 2, "zigzag") == [[(0, 3), (8, 10)], [(3, 6), (6, 8)]]
    assert rank_spans(7, 3, "zigzag") == [[(0, 2), (6, 7)], [(2, 3), (5, 6)], [(3, 4), (4, 5)]]
    with pytest.raises(ValueError, match="order must be one of 'contiguous', 'zigzag', got 'striped'"):
        rank_spans(4, 2, "striped")


# -- mutants of the merge: each must fail check_merge ------------------------------------------------------
MERGE = Path(_merge.__file__)
MUTANTS = [
    ("merge-shifts-ignored", "merge", "la, lb = (la + (sa - base), lb + (sb - base))", "pass"),
    ("attend-unshifted", "attend_block", "masks = masks.with_bias(masks.bias - finite)", "pass"),
    ("absorbed-rows-keep-logits", "attend_block", "q = xp.where(absorbed, 0, q)", "pass"),
    ("share-flipped", "merge", "d = xp.where(none, 0, lb - xp.where(none, 0, la))",
     "d = xp.where(none, 0, xp.where(none, 0, la) - lb)"),
    ("empty-rows-nan", "merge", "d = xp.where(none, 0, lb - xp.where(none, 0, la))", "d = lb - la"),
    ("shift-ignores-rules", "_largest_visible", "visible = masks.visible(xp)", "visible = masks.keep"),
    ("sinks-without-value-zero", "with_sinks", "Partial(xp.zeros_like(part.ctx), lse, shift)",
     "Partial(part.ctx, lse, shift)"),
]


def _mutated(name, function, old, new):
    source = ast_edit.apply(MERGE.read_text(), function, old, new)
    spec = importlib.util.spec_from_loader(f"_merge_mutant_{name.replace('-', '_')}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        exec(compile(source, f"{MERGE} ({name})", "exec"), module.__dict__)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_every_mutant_of_the_merge_fails_the_checks(mutant):
    module = _mutated(*mutant)
    with pytest.raises(AssertionError), np.errstate(all="ignore"):  # a wrong number, not a warning on the way
        check_merge(module, "numpy")
