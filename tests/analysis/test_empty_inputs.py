"""Empty and unusual inputs to the analysis functions (issue 29): 0 tokens, 0 heads, 0 layers, 0 sentences give
an empty result or one clear error, never an IndexError or a RuntimeWarning; tokens may come as any iterable
(tuple, generator), as sentences may for head_roles."""

from __future__ import annotations

import numpy as np
import pytest

import mha.analysis as ma

TOKENS = ["[CLS]", "the", "light", "##house", ".", "[SEP]"]


def _atts(layers=2, heads=3, L=len(TOKENS), seed=0):
    a = np.random.default_rng(seed).random((layers, heads, L, L))
    return a / a.sum(-1, keepdims=True)


def _iterables(tokens):
    """The same tokens as a list, a tuple, a generator and a map object."""
    return [list(tokens), tuple(tokens), (t for t in tokens), map(str, tokens)]


@pytest.mark.parametrize("form", range(4), ids=["list", "tuple", "generator", "map"])
def test_tokens_may_be_any_iterable(form):
    A = _atts()
    expected_roles = ma.head_roles(A, TOKENS)
    assert [r.as_dict() for r in ma.head_roles(A, _iterables(TOKENS)[form])] == [r.as_dict() for r in expected_roles]
    W, words = ma.to_words(A, _iterables(TOKENS)[form])
    W_ref, words_ref = ma.to_words(A, TOKENS)
    assert words == words_ref == ["[CLS]", "the", "lighthouse", ".", "[SEP]"] and np.array_equal(W, W_ref)
    assert ma.word_spans(_iterables(TOKENS)[form]) == ma.word_spans(TOKENS)
    np.testing.assert_equal(ma.role_scores(A[0, 0], _iterables(TOKENS)[form]), ma.role_scores(A[0, 0], TOKENS))  # NaN: no repeat


def test_sentences_may_come_from_generators():
    atts = [_atts(seed=1), _atts(L=4, seed=2)]
    toks = [TOKENS, ["[CLS]", "a", "b", "[SEP]"]]
    expected = [r.as_dict() for r in ma.head_roles(atts, toks)]
    assert [r.as_dict() for r in ma.head_roles(iter(atts), (t for t in toks))] == expected
    assert len(ma.corpus_roles(iter(atts), (tuple(t) for t in toks), resamples=20)) == 6


@pytest.mark.parametrize("call, message", [
    (lambda: ma.head_roles(np.zeros((2, 3, 0, 0)), []), r"a sentence of 0 tokens has no attention to label"),
    (lambda: ma.head_roles([_atts(), np.zeros((2, 3, 0, 0))], [TOKENS, []]),
     r"a sentence of 0 tokens has no attention to label \(sentence 1\)"),
    (lambda: ma.head_roles([], []), r"no sentences: give one \(layers, heads, L, L\) array"),
    (lambda: ma.role_scores(np.zeros((0, 0)), []), r"a sentence of 0 tokens has no attention to score"),
    (lambda: ma.corpus_roles([_atts(), np.zeros((2, 3, 0, 0))], [TOKENS, []]), r"sentence 1 has 0 tokens"),
    (lambda: ma.rollout(np.zeros((2, 0, 4, 4))), r"attentions has 0 heads \(shape \(2, 0, 4, 4\)\): rollout averages"),
    (lambda: ma.head_roles(_atts(), "the cat"), r"tokens must be a sequence of str .* got str"),
    (lambda: ma.to_words(_atts(), iter([1, 2, 3, 4, 5, 6])), r"tokens must hold str .* got a int: 1"),
])
def test_empty_or_malformed_inputs_are_one_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_empty_results_where_empty_makes_sense():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ma.head_roles(np.zeros((2, 0, 3, 3)), ["a", "b", "c"]) == []  # no heads: no roles
        assert ma.head_roles(np.zeros((0, 2, 3, 3)), ["a", "b", "c"]) == []
        assert ma.rollout(np.zeros((0, 2, 3, 3))).shape == (0, 3, 3)  # no layers: no rollout steps
        assert ma.rollout(np.zeros((2, 1, 0, 0))).shape == (2, 0, 0)  # no tokens: empty maps
        W, words = ma.to_words(np.zeros((2, 0, 0)), iter([]))
        assert W.shape == (2, 0, 0) and words == []
        assert ma.word_spans(iter([])) == []


@pytest.mark.parametrize("L", [1, 2, 5])
def test_the_smallest_sentences_score_without_warnings(L):
    import warnings

    tokens = ["[CLS]", "a", "b", "c", "[SEP]"][:L]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roles = ma.head_roles(_atts(L=L), tokens)
        R = ma.rollout(_atts(L=L))
    assert len(roles) == 6 and all(0 <= r.score <= 1 for r in roles)
    np.testing.assert_allclose(R.sum(-1), 1.0)
