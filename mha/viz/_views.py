"""Derived encodings for the views: the same text at word level, or as rollout, so that every renderer
(terminal, PNG, JSON, the report) shows them without knowing how they were made."""

from __future__ import annotations

import dataclasses

import numpy as np


def _encoding(enc, tokens, attentions, head_labels):
    n = len(tokens)
    return dataclasses.replace(enc, tokens=list(tokens), ids=np.arange(n), hidden_states=np.zeros((n, 0), np.float32),
                               attentions=attentions.astype(np.float32), head_labels=head_labels)


def words_encoding(enc):
    """``enc`` with WordPiece pieces merged into words (:func:`mha.analysis.to_words`): tokens are the
    words, attentions (layers, heads, W, W). Hidden states are not carried over (shape (W, 0))."""
    from ..analysis import to_words

    att, words = to_words(enc.attentions, enc.tokens)
    return _encoding(enc, words, att, dict(enc.head_labels))


def rollout_encoding(enc, residual: float = 0.5):
    """``enc`` as attention rollout (:func:`mha.analysis.rollout`): one "head" per layer, head 0 of layer
    l being the rollout through layers 0..l, labelled so; attentions (layers, 1, L, L)."""
    from ..analysis import rollout

    R = rollout(enc.attentions, residual)[:, None]  # (layers, 1, L, L)
    labels = {(layer, 0): f"rollout through layers 0-{layer}" for layer in range(R.shape[0])}
    return _encoding(enc, enc.tokens, R, labels)
