"""Word-level attention: WordPiece pieces merged back into words (Clark et al., 2019, section 2).

A word is a run of pieces: one that does not start with ``##`` followed by the ``##`` pieces after it.
Special tokens ([CLS], [SEP], ...) are words of their own, and a ``##`` piece right after one (or at the
very start) starts a word too. With ``S`` the (words, tokens) 0/1 matrix of which piece belongs to which
word and ``n_w`` the number of pieces of word w:

    to a word   = sum over its pieces        (columns:  A S^T)
    from a word = mean over its pieces       (rows:     diag(1/n) S A S^T)

so every row of the result still sums to what the rows of ``A`` summed to (1 for a softmax), and a text
without split words comes back unchanged.
"""

from __future__ import annotations

import numpy as np

from ._roles import SPECIAL, token_list


def word_spans(tokens) -> list[tuple[int, int]]:
    """[(start, stop)] of each word's pieces, in order; they tile ``range(len(tokens))``."""
    tokens = token_list(tokens)
    spans: list[list[int]] = []
    for i, tok in enumerate(tokens):
        joins = (tok.startswith("##") and len(tok) > 2 and spans and tokens[i - 1] not in SPECIAL
                 and tok not in SPECIAL)
        if joins:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return [(a, b) for a, b in spans]


def word_text(tokens, spans) -> list[str]:
    """Each word: its pieces joined, ``##`` dropped ("light", "##house" -> "lighthouse"; a ``##s`` that
    starts a word is "s")."""
    return ["".join(t[2:] if t.startswith("##") and len(t) > 2 else t for t in tokens[a:b]) for a, b in spans]


def to_words(attentions, tokens) -> tuple[np.ndarray, list[str]]:
    """Merge WordPiece pieces into words.

    Args:
        attentions: (..., L, L) weights, rows = queries (e.g. an encoding's (layers, heads, L, L)).
        tokens: the L tokens (a list, tuple or any iterable of str).

    Returns:
        (word_attentions (..., W, W) float64, words: list of W str). Attention *to* a word is the sum
        over its pieces, *from* a word the mean over its pieces; special tokens stay words.
    """
    tokens = token_list(tokens)
    A = np.asarray(attentions)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2] or A.shape[-1] != len(tokens):
        raise ValueError(f"attentions must be (..., L, L) with L = len(tokens) = {len(tokens)}, got shape {A.shape}")
    if not np.issubdtype(A.dtype, np.floating):
        raise TypeError(f"attentions must be floating point, got dtype {A.dtype}")
    spans = word_spans(tokens)
    words = word_text(tokens, spans)
    if len(spans) == len(tokens):
        return A.astype(np.float64), words
    return merge(A, spans), words


def merge(A, spans) -> np.ndarray:
    """(..., L, L) -> (..., W, W) float64 by the rule above: columns summed over each word's pieces
    (``A S^T``), then rows averaged (``diag(1/n) S (A S^T)``), in O(L^2) with ``np.add.reduceat``."""
    starts = [a for a, _ in spans]
    counts = np.array([b - a for a, b in spans], np.float64)  # (W,)
    to_words = np.add.reduceat(np.asarray(A, np.float64), starts, axis=-1)  # (..., L, W)
    return np.add.reduceat(to_words, starts, axis=-2) / counts[:, None]  # (..., W, W)
