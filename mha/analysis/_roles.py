"""Labelling heads by what they attend to.

For one sentence with weights P (L x L, rows = queries), each head gets a score per role, a mean over
its query rows (and over sentences):

============  ====================================================================================
role          score
============  ====================================================================================
previous      P[i, i-1]                              mean over i >= 1
next          P[i, i+1]                              mean over i <= L-2
self          P[i, i]
first         P[i, 0]                                ([CLS] for BERT)
last          P[i, L-1]                              ([SEP] for BERT)
punctuation   sum of P[i, j] over punctuation tokens j (sentences without any are skipped)
broad         H(P[i]) / log(L), the normalised entropy (1 = uniform)
content       sum of P[i, j] over the other tokens: not special, not punctuation, not i-1, i, i+1
same_word     sum of P[i, j] over the other copies j != i of token i's word, mean over the rows i
              whose word occurs again (not special tokens, punctuation or ## pieces; sentences
              without a repeated word are skipped)
local         sum of P[i, j] over 1 <= |i - j| <= LOCAL (4): the tokens around i, itself excluded;
              only for sentences of at least 4 LOCAL + 2 (18) tokens, where those 9 positions are at most
              half of the sentence (in shorter ones uniform attention would score 0.5 or more; skipped)
============  ====================================================================================

All scores lie in [0, 1]. The role: the positional, special or same-word role (previous, next, self,
first, last, punctuation, same_word) with the most mass if that mass is at least ``SHARP`` (0.5);
otherwise "broad" if the normalised entropy is at least ``BROAD`` (0.7); otherwise "local" if its mass
is at least ``SHARP``; otherwise whichever mass is largest, "local" and "content" included. (Entropy
and mass are not on one scale, hence the rule rather than a plain argmax.) "same_word" and "local" came
later than the others and are appended to ``ROLES``: a constructed same-word head was labelled "first"
(where it looks when its word does not recur) and heads spread over their neighbours "content".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ROLES = ("previous", "next", "self", "first", "last", "punctuation", "broad", "content", "same_word", "local")
POINTED = ("previous", "next", "self", "first", "punctuation", "last", "same_word")  # ties go to the earlier
SHARP, BROAD = 0.5, 0.7
LOCAL = 4  # "local": keys within this many positions of the query, itself excluded
SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "[MASK]"}


def token_list(tokens, name: str = "tokens") -> list[str]:
    """``tokens`` (a list, tuple, generator or any iterable of str) as a list; TypeError naming ``name``
    for a plain string (which would be read character by character) or a non-str item."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"{name} must be a sequence of str (one per position), got {type(tokens).__name__}")
    out = list(tokens)
    bad = next((t for t in out if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{name} must hold str (one per position), got a {type(bad).__name__}: {bad!r}")
    return out


def is_punctuation(token: str) -> bool:
    t = token[2:] if token.startswith("##") else token
    return bool(t) and token not in SPECIAL and all(not c.isalnum() for c in t)


@dataclass
class HeadRole:
    """One head's label. ``layer`` and ``head`` are 0-based; ``scores`` holds every role's score."""

    layer: int
    head: int
    role: str
    score: float
    scores: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "role": self.role, "score": round(self.score, 4),
                "scores": {k: round(v, 4) for k, v in self.scores.items()}}


def role_score_array(P, tokens) -> np.ndarray:
    """Scores of every role, in ``ROLES`` order, for many heads at once: P (..., L, L) -> (..., len(ROLES))
    float64. Punctuation is NaN when the sentence has none, same_word when no word of it recurs, local
    when it is shorter than 4 LOCAL + 2 tokens."""
    P = np.asarray(P, np.float64)
    tokens = token_list(tokens)
    L = P.shape[-1] if P.ndim else 0
    if P.ndim < 2 or P.shape[-2] != L or len(tokens) != L:
        raise ValueError(f"weights must be (..., L, L) with L = len(tokens) = {len(tokens)}, got {P.shape}")
    if L == 0:
        raise ValueError("a sentence of 0 tokens has no attention to score: give at least one token")
    idx = np.arange(L)
    diag = np.diagonal(P, axis1=-2, axis2=-1)  # (..., L)
    s = {"self": diag.mean(-1), "first": P[..., :, 0].mean(-1), "last": P[..., :, L - 1].mean(-1)}
    zero = np.zeros(P.shape[:-2])
    s["previous"] = P[..., idx[1:], idx[1:] - 1].mean(-1) if L > 1 else zero
    s["next"] = P[..., idx[:-1], idx[:-1] + 1].mean(-1) if L > 1 else zero
    punct = np.array([is_punctuation(t) for t in tokens])
    s["punctuation"] = P[..., punct].sum(-1).mean(-1) if punct.any() else zero + np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(P > 0, P * np.log(P), 0.0).sum(-1)  # (..., L)
    s["broad"] = (ent / np.log(L)).mean(-1) if L > 1 else zero
    other = np.array([t not in SPECIAL for t in tokens]) & ~punct
    near = np.abs(idx[:, None] - idx[None, :]) <= 1
    s["content"] = (P * (other[None, :] & ~near)).sum(-1).mean(-1)
    words = np.array([t if t not in SPECIAL and not is_punctuation(t) and not t.startswith("##") else None
                      for t in tokens], dtype=object)
    copies = (words[:, None] == words[None, :]) & (words != None)[:, None] & ~np.eye(L, dtype=bool)  # noqa: E711
    rows = copies.any(-1)  # (L,): queries whose word occurs again
    s["same_word"] = (P * copies).sum(-1)[..., rows].mean(-1) if rows.any() else zero + np.nan
    dist = np.abs(idx[:, None] - idx[None, :])
    around = (dist >= 1) & (dist <= LOCAL)
    s["local"] = (P * around).sum(-1).mean(-1) if L >= 4 * LOCAL + 2 else zero + np.nan
    return np.stack([np.broadcast_to(s[k], P.shape[:-2]) for k in ROLES], -1)


def role_scores(P: np.ndarray, tokens) -> dict:
    """Scores of every role for one head on one sentence; P is (L, L)."""
    P = np.asarray(P, np.float64)
    tokens = token_list(tokens)
    if P.ndim != 2 or P.shape != (len(tokens), len(tokens)):
        raise ValueError(f"weights must be (L, L) with L = len(tokens) = {len(tokens)}, got {P.shape}")
    return {k: float(v) for k, v in zip(ROLES, role_score_array(P, tokens))}


RULE = (f"role: the largest of {', '.join(POINTED)} if that share of the head's attention is at least "
        f"{SHARP:.2f}; else broad if the entropy of its rows, normalised to [0, 1], is at least {BROAD:.2f}; else local "
        f"(keys 1 to {LOCAL} positions away; texts of {4 * LOCAL + 2}+ tokens) if its share is at least {SHARP:.2f}; "
        f"else the largest share, local and "
        f"content included. Scores are shares of attention, except broad's (the entropy).")
GLOSSARY = {
    "previous": "the token before", "next": "the token after", "self": "itself",
    "first": "the first token ([CLS] in BERT)", "last": "the last token ([SEP] in BERT)",
    "punctuation": "punctuation marks", "same_word": "other copies of its own word",
    "local": f"the tokens 1 to {LOCAL} positions away (in texts of {4 * LOCAL + 2} tokens or more)", "broad": "spread evenly (score: normalised entropy)",
    "content": "other words (not its neighbours i-1 and i+1, not special tokens or punctuation)",
}


def pick_role(scores: dict) -> str:
    """The rule of the module docstring. ``scores`` may lack the later roles (same_word, local): 0."""
    get = lambda r: scores.get(r, 0.0)  # noqa: E731
    pointed = max(POINTED, key=get)
    if get(pointed) >= SHARP:
        return pointed
    if get("broad") >= BROAD:
        return "broad"
    if get("local") >= SHARP:
        return "local"
    return max(POINTED + ("local", "content"), key=get)


def head_roles(attentions, tokens) -> list[HeadRole]:
    """Label every head.

    Args:
        attentions: (layers, heads, L, L) for one sentence, or a list (tuple, generator) of such arrays
            (several sentences). (``mha.analysis.head_roles`` also takes a decoder model: see
            :func:`mha.analysis._decoder_roles.head_roles`.)
        tokens: the L tokens of the sentence (any iterable of str), or one token list per sentence.

    Returns:
        one :class:`HeadRole` per (layer, head), in order; scores averaged over the sentences (an empty
        list for 0 layers or 0 heads). A sentence of 0 tokens, or no sentence at all, is a ValueError.
    """
    many = not hasattr(attentions, "shape") and not isinstance(attentions, (str, bytes)) and (
        isinstance(attentions, (list, tuple)) or hasattr(attentions, "__next__"))
    atts = list(attentions) if many else [attentions]
    toks = [token_list(t, f"tokens[{i}]") for i, t in enumerate(tokens)] if many else [token_list(tokens)]
    if not atts and not toks:
        raise ValueError("no sentences: give one (layers, heads, L, L) array and its tokens, or lists of them")
    if len(atts) != len(toks):
        raise ValueError(f"need one token list per attention array, got {len(atts)} arrays and {len(toks)} lists")
    atts = [np.asarray(a) for a in atts]
    for i, (a, t) in enumerate(zip(atts, toks)):
        if a.ndim != 4 or a.shape[-1] != a.shape[-2] or a.shape[-1] != len(t):
            raise ValueError(f"attentions must be (layers, heads, L, L) with L = len(tokens) = {len(t)}, "
                             f"got {a.shape}" + (f" for sentence {i}" if many else ""))
        if not t:
            raise ValueError("a sentence of 0 tokens has no attention to label" + (f" (sentence {i})" if many else "")
                             + ": give at least one token")
    if len({a.shape[:2] for a in atts}) != 1:
        raise ValueError(f"every sentence needs the same (layers, heads), got {sorted({a.shape[:2] for a in atts})}")
    layers, heads = atts[0].shape[:2]
    mean = nan_mean(np.stack([role_score_array(a, t) for a, t in zip(atts, toks)]))  # (layers, heads, 8)
    out = []
    for layer in range(layers):
        for head in range(heads):
            scores = {r: float(v) for r, v in zip(ROLES, mean[layer, head])}
            role = pick_role(scores)
            out.append(HeadRole(layer, head, role, scores[role], scores))
    return out


def nan_mean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean over ``axis`` skipping NaN (sentences without punctuation); 0 where every entry is NaN."""
    count = (~np.isnan(x)).sum(axis)
    return np.where(count > 0, np.nansum(x, axis) / np.maximum(count, 1), 0.0)
