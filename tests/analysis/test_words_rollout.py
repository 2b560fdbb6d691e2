"""Properties of mha.analysis.to_words (WordPiece pieces merged, Clark et al.'s rule) and
mha.analysis.rollout (Abnar & Zuidema), against slow explicit references, over Hypothesis-drawn
attention (seeded tensors, drawn structure), plus their argument errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import mha.analysis as ma

WORDS = ["the", "light", "keep", "was", "old", "sea", ".", ","]
SPECIAL = ["[CLS]", "[SEP]"]


@st.composite
def texts(draw, min_len=1, max_len=12):
    """(tokens, attentions (layers, heads, L, L) with rows on the simplex, some rows sharply peaked)."""
    n = draw(st.integers(min_len, max_len))
    toks = [draw(st.sampled_from(WORDS + ["##s", "##er", "##house"] + SPECIAL)) for _ in range(n)]
    layers, heads, seed = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(layers, heads, n, n)) * draw(st.sampled_from([0.5, 3.0, 30.0]))
    P = np.exp(logits - logits.max(-1, keepdims=True))
    return toks, (P / P.sum(-1, keepdims=True)).astype(draw(st.sampled_from([np.float32, np.float64])))


def _words_reference(A, spans):
    """Explicit loops: to word b = sum over its pieces' columns; from word a = mean over its pieces' rows."""
    out = np.zeros(A.shape[:-2] + (len(spans), len(spans)))
    for a, (r0, r1) in enumerate(spans):
        for b, (c0, c1) in enumerate(spans):
            out[..., a, b] = A[..., r0:r1, c0:c1].astype(np.float64).sum(-1).mean(-1)
    return out


@given(texts())
@example((["[CLS]", "light", "##house", "##s", "were", "##s", "[SEP]", "##er"], np.full((1, 1, 8, 8), 1 / 8)))
def test_to_words_rows_still_sum_to_one_and_match_the_reference(case):
    toks, A = case
    W, words = ma.to_words(A, toks)
    spans = ma.word_spans(toks)
    assert [i for a, b in spans for i in range(a, b)] == list(range(len(toks)))  # spans tile the tokens
    assert W.shape == A.shape[:-2] + (len(words), len(words)) and len(spans) == len(words)
    np.testing.assert_allclose(W.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(W, _words_reference(A, spans), atol=1e-12)
    for (a, b), w in zip(spans, words):
        assert w == "".join(t.removeprefix("##") for t in toks[a:b])


@given(texts())
def test_to_words_leaves_a_text_without_split_words_unchanged(case):
    toks, A = case
    toks = [t if not t.startswith("##") else "sea" for t in toks]
    W, words = ma.to_words(A, toks)
    assert words == toks
    np.testing.assert_array_equal(W, A.astype(np.float64))


def test_to_words_on_a_lighthouse():
    toks = ["[CLS]", "light", "##house", "keep", "##ers", "[SEP]", "##s"]
    A = np.random.default_rng(0).dirichlet(np.ones(7), size=(2, 7))  # (2, 7, 7)
    W, words = ma.to_words(A, toks)
    assert words == ["[CLS]", "lighthouse", "keepers", "[SEP]", "s"]  # a ## piece after a special token stands alone
    np.testing.assert_allclose(W[..., 1, 2], (A[..., 1, 3] + A[..., 1, 4] + A[..., 2, 3] + A[..., 2, 4]) / 2)


def _rollout_reference(A, r):
    L = A.shape[-1]
    out, R = [], np.eye(L)
    for layer in A.astype(np.float64):
        M = r * np.eye(L) + (1 - r) * sum(layer) / len(layer)
        M = M / M.sum(-1, keepdims=True)
        R = M @ R
        out.append(R)
    return np.array(out)


@given(texts(), st.floats(0.0, 1.0))
@example((["a", "b"], np.array([[[[1.0, 0.0], [0.0, 1.0]]]])), 0.0)
def test_rollout_rows_sum_to_one_and_match_the_reference(case, r):
    _, A = case
    R = ma.rollout(A, residual=r)
    assert R.shape == (A.shape[0],) + A.shape[-2:] and R.dtype == np.float64
    np.testing.assert_allclose(R.sum(-1), 1.0, atol=1e-9)
    np.testing.assert_allclose(R, _rollout_reference(A, r), atol=1e-12)
    assert (R >= 0).all()


@given(texts())
def test_rollout_residual_one_is_the_identity_and_zero_one_layer_is_the_mean(case):
    _, A = case
    L = A.shape[-1]
    np.testing.assert_array_equal(ma.rollout(A, residual=1.0), np.broadcast_to(np.eye(L), (A.shape[0], L, L)))
    np.testing.assert_allclose(ma.rollout(A[:1], residual=0.0)[0], A[0].astype(np.float64).mean(0), atol=1e-12)


def test_rollout_keeps_an_all_zero_row_at_zero():
    A = np.zeros((2, 1, 3, 3))
    A[:, :, 1:] = 1 / 3  # row 0 of every layer: a query with no visible key (all-zero weights)
    R = ma.rollout(A, residual=0.0)
    assert np.isfinite(R).all() and (R[:, 0] == 0).all()
    np.testing.assert_allclose(R[0, 1:].sum(-1), 1.0)
    np.testing.assert_allclose(R[1, 1:].sum(-1), 2 / 3)  # the empty row passes nothing on


@pytest.mark.parametrize("args,error,match", [
    ((np.ones((2, 3, 3)) / 3, ["a", "b", "c"]), ValueError, r"attentions must be \(layers, heads, L, L\)"),
    ((np.ones((1, 1, 3, 4)) / 4, ["a", "b", "c"]), ValueError, r"got shape \(1, 1, 3, 4\)"),
    ((np.ones((1, 1, 3, 3), int), ["a", "b", "c"]), TypeError, "floating point, got dtype int"),
])
def test_rollout_errors(args, error, match):
    with pytest.raises(error, match=match):
        ma.rollout(args[0])


@pytest.mark.parametrize("residual", [-0.1, 1.5, True, "0.5", float("nan")])
def test_rollout_residual_must_be_a_share(residual):
    with pytest.raises(ValueError, match=r"residual must be a number in \[0, 1\]"):
        ma.rollout(np.ones((1, 1, 2, 2)) / 2, residual=residual)


def test_to_words_errors():
    with pytest.raises(ValueError, match=r"L = len\(tokens\) = 2, got shape \(1, 3, 3\)"):
        ma.to_words(np.ones((1, 3, 3)), ["a", "b"])
    with pytest.raises(TypeError, match="tokens must be a sequence of str"):
        ma.to_words(np.ones((2, 2)), "ab")
    with pytest.raises(TypeError, match=r"tokens must hold str \(one per position\), got a int: 3"):
        ma.to_words(np.ones((2, 2)), ["a", 3])
    with pytest.raises(TypeError, match="floating point, got dtype bool"):
        ma.to_words(np.ones((2, 2), bool), ["a", "b"])
