"""Induction heads (Olsson et al., 2022): attention from a token's later occurrence to the token that
followed its earlier occurrence, the pattern behind in-context copying ([A][B] ... [A] -> [B]).

For one sequence of ids and a head's weights P (T, T, rows = queries), a query i whose token occurred
before, at positions j < i, scores the weight it puts on the positions after those occurrences:

    score_i = sum over {j < i : ids[j] = ids[i]} of P[i, j + 1]

and the head's induction score is the mean of score_i over every such query (over all sequences given).
On repeated random tokens ``r r`` (:func:`repeated_tokens`) each query of the second half has one earlier
occurrence, so a perfect induction head scores 1; a previous-token head scores about 0; uniform causal
attention scores about the share of one position (:func:`induction_scores` returns that chance too).
"""

from __future__ import annotations

import numpy as np


def repeated_tokens(batch: int, length: int, vocab_size: int, seed=None) -> np.ndarray:
    """(batch, 2 * length) int64: ``length`` random tokens, each sequence's own, then the same again.
    Tokens are drawn without repeats within a half when the vocabulary allows (length <= vocab_size), so
    that each token of the second half has exactly one earlier occurrence."""
    for name, v in (("batch", batch), ("length", length), ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    rng = np.random.default_rng(seed)
    if length <= vocab_size:
        half = np.stack([rng.permutation(vocab_size)[:length] for _ in range(batch)])
    else:
        half = rng.integers(0, vocab_size, size=(batch, length))
    return np.concatenate([half, half], axis=1).astype(np.int64)


def _targets(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, T) float: 1 at (i, j + 1) for every earlier occurrence j < i of ids[i]; (T,) bool: queries
    that have one."""
    ids = np.asarray(ids)
    T = ids.shape[0]
    same = (ids[:, None] == ids[None, :]) & np.tri(T, k=-1, dtype=bool)  # (i, j): j < i, same token
    target = np.zeros((T, T))
    target[:, 1:] = same[:, :-1]  # j -> j + 1 (j + 1 <= i, as j < i)
    return target, same.any(1)


def induction_scores(attentions, ids, *, return_chance: bool = False):
    """Each head's induction score (module docstring), pooled over the sequences given.

    Args:
        attentions: (layers, heads, T, T) weights of one sequence, a list of such arrays (one per
            sequence, T may differ), or (B, layers, heads, T, T).
        ids: the sequence's (T,) token ids, a list of them, or (B, T).
        return_chance: also return what uniform causal attention would score (each query's weight
            spread over the i + 1 positions it may see), pooled the same way: a float.

    Returns:
        (layers, heads) float64 in [0, 1] (NaN when no query has an earlier occurrence of its token),
        or (scores, chance).
    """
    atts, seqs = attentions, ids
    if not isinstance(atts, (list, tuple)):
        atts = np.asarray(atts)
        atts, seqs = (list(atts), list(np.asarray(seqs))) if atts.ndim == 5 else ([atts], [np.asarray(seqs)])
    if len(atts) != len(seqs) or not atts:
        raise ValueError(f"need one id sequence per attention array, got {len(atts)} arrays and {len(seqs)}")
    total, count, chance = None, 0, 0.0
    for a, s in zip(atts, seqs):
        a, s = np.asarray(a, np.float64), np.asarray(s)
        if a.ndim != 4 or a.shape[-1] != a.shape[-2] or s.shape != (a.shape[-1],):
            raise ValueError(f"attentions must be (layers, heads, T, T) with ids (T,), got {a.shape} and {s.shape}")
        target, has = _targets(s)
        per_query = (a * target).sum(-1)  # (layers, heads, T)
        part = per_query[..., has].sum(-1)
        if total is not None and part.shape != total.shape:
            raise ValueError(f"every sequence needs the same (layers, heads), got {total.shape} and {part.shape}")
        total = part if total is None else total + part
        count += int(has.sum())
        chance += float((target.sum(-1)[has] / (np.arange(s.shape[0])[has] + 1)).sum())
    scores = total / count if count else np.full(total.shape, np.nan)
    return (scores, chance / count if count else float("nan")) if return_chance else scores
