"""mha.analysis.induction_scores on planted patterns: an exact induction head scores 1, a previous-token
head 0, uniform causal attention its chance; pooling over sequences; bad input."""

from __future__ import annotations

import numpy as np
import pytest

import mha.analysis as ma


def patterns(ids):
    """(1, 4, T, T): induction (to the token after the last earlier occurrence, else position 0),
    previous token, uniform causal, and attention to the earlier occurrence itself."""
    T = len(ids)
    ind, prev, same = np.zeros((T, T)), np.zeros((T, T)), np.zeros((T, T))
    for i in range(T):
        earlier = [j for j in range(i) if ids[j] == ids[i]]
        ind[i, earlier[-1] + 1 if earlier else 0] = 1
        same[i, earlier[-1] if earlier else 0] = 1
        prev[i, max(i - 1, 0)] = 1
    uni = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    return np.stack([ind, prev, uni, same])[None]


def test_planted_heads_score_as_defined():
    ids = ma.repeated_tokens(4, 9, 30, seed=0)
    assert ids.shape == (4, 18) and np.array_equal(ids[:, :9], ids[:, 9:])
    assert all(len(set(r[:9])) == 9 for r in ids)  # no repeats within a half
    atts = [patterns(s) for s in ids]
    scores, chance = ma.induction_scores(atts, list(ids), return_chance=True)
    assert scores.shape == (1, 4)
    assert scores[0, 0] == 1.0 and scores[0, 1] == 0.0 and scores[0, 3] == 0.0
    assert np.isclose(scores[0, 2], chance) and 0 < chance < 0.1
    batched = ma.induction_scores(np.stack(atts), ids)  # (B, layers, heads, T, T)
    assert np.array_equal(batched, scores)


def test_pools_queries_over_sequences():
    """Sequences with more qualifying queries weigh more: the mean is over queries, not sequences."""
    a, b = np.array([1, 2, 1, 2, 1]), np.array([5, 6, 7, 5])
    pa, pb = patterns(a), patterns(b)
    pb[0, 0] = np.eye(4)  # head 0 wrong on sequence b (its one query scores 0)
    s = ma.induction_scores([pa, pb], [a, b])[0, 0]
    assert np.isclose(s, 3 / 4)  # three qualifying queries in a (score 1), one in b (score 0)
    assert np.isnan(ma.induction_scores(patterns(np.arange(5)), np.arange(5))).all()  # no repeats


def test_bad_input():
    ids = np.arange(6)
    with pytest.raises(ValueError, match=r"attentions must be \(layers, heads, T, T\) with ids \(T,\)"):
        ma.induction_scores(np.zeros((1, 2, 6, 6)), np.arange(5))
    with pytest.raises(ValueError, match="need one id sequence per attention array"):
        ma.induction_scores([np.zeros((1, 2, 6, 6))] * 2, [ids])
    with pytest.raises(ValueError, match="every sequence needs the same"):
        ma.induction_scores([np.zeros((1, 2, 6, 6)), np.zeros((1, 3, 6, 6))], [ids, ids])
    with pytest.raises(ValueError, match="length must be a positive int, got 0"):
        ma.repeated_tokens(2, 0, 10)
