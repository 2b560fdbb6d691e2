"""The built-in demo model: one attention layer with hand-set weights, no download.

CONSTRUCTED, NOT TRAINED. Each of its eight heads is wired to show one textbook pattern exactly, so
that ``mha demo`` has something to show on any machine. Every token i of ``[CLS] w1 ... wn [SEP]`` is
embedded as ``x_i = [p_i ; r(w_i) ; is_first, is_delimiter, 1, is_last ; 0...]`` with ``p_i`` the one-hot of its
position, ``r(w)`` a fixed random unit vector per word (seeded by the word's hash; 0 for [CLS] and [SEP]). The heads
(scale 1, logits in units of ALPHA):

====  ==============  =====================================================================
head  pattern         q_i . k_j
====  ==============  =====================================================================
0     previous token  ALPHA [j = i - 1]                       (shift of the one-hots)
1     next token      ALPHA [j = i + 1]
2     self            ALPHA [j = i]
3     first token     ALPHA [j = 0]                           ([CLS])
4     delimiter       ALPHA [w_j is punctuation or [SEP]]
5     same word       ALPHA r(w_i).r(w_j) - 2 ALPHA [j = i] + ALPHA/2 [j = 0]   (other copies of the word)
6     last token      ALPHA [j = L - 1]                       ([SEP])
7     broad           0                                        (uniform average)
====  ==============  =====================================================================
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from .._backends import resolve, to_numpy
from .._layer import MultiHeadAttention
from .._weights import AttentionWeights
from ._common import Encoding, PrunableHeads, check_text

ALPHA = 12.0
MAX_LENGTH = 48  # positions, [CLS] and [SEP] included
WORD_DIM = 64
HEAD_DIM = 128
LABELS = ("previous token", "next token", "self", "first token", "delimiter", "same word", "last token", "broad")
_P, _R = 0, MAX_LENGTH  # where the position one-hots and the word vector sit in x
_FIRST, _DELIM, _ONE, _LAST = (MAX_LENGTH + WORD_DIM + i for i in range(4))
_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with inner apostrophes) and single punctuation marks, between [CLS] and [SEP]."""
    return ["[CLS]"] + _TOKEN.findall(text.lower()) + ["[SEP]"]


def word_vector(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).normal(size=WORD_DIM)
    return v / np.linalg.norm(v)


def _weights() -> AttentionWeights:
    H, D = len(LABELS), HEAD_DIM
    E = H * D
    Wq, Wk, Wv = np.zeros((E, E)), np.zeros((E, E)), np.zeros((E, E))
    P = MAX_LENGTH
    for h in range(H):
        o = h * D  # this head's rows
        if h in (0, 1, 2):  # positional: q = ALPHA p_(i -1 / +1 / 0), k = p_j
            shift = {0: -1, 1: 1, 2: 0}[h]
            for i in range(P):
                if 0 <= i + shift < P:
                    Wq[o + i + shift, _P + i] = ALPHA
                Wk[o + i, _P + i] = 1.0
        elif h in (3, 4):  # q = ALPHA * 1, k = is_first / is_delimiter
            Wq[o, _ONE] = ALPHA
            Wk[o, _FIRST if h == 3 else _DELIM] = 1.0
        elif h == 5:  # same word: word vectors, minus self, plus a small pull to [CLS] as the fallback
            for d in range(WORD_DIM):
                Wq[o + d, _R + d] = ALPHA
                Wk[o + d, _R + d] = 1.0
            for i in range(P):
                Wq[o + WORD_DIM + i, _P + i] = -2 * ALPHA
                Wk[o + WORD_DIM + i, _P + i] = 1.0
            Wq[o + WORD_DIM + P, _ONE] = ALPHA / 2
            Wk[o + WORD_DIM + P, _FIRST] = 1.0
        elif h == 6:  # last token: keys carry "is last"
            Wq[o, _ONE] = ALPHA
            Wk[o, _LAST] = 1.0
        for d in range(WORD_DIM):  # every head reads the word vectors as values
            Wv[o + d, _R + d] = 1.0
    Wo = np.zeros((E, E))
    for h in range(H):  # sum the heads' word vectors back into the word-vector slots
        for d in range(WORD_DIM):
            Wo[_R + d, h * D + d] = 1.0 / H
    return AttentionWeights(Wq, Wk, Wv, Wo, num_heads=H)


class BuiltinModel(PrunableHeads):
    """The constructed demo model (see the module docstring). Same ``encode``/``embed`` as BertModel."""

    name = "builtin"
    num_layers = 1
    num_heads = len(LABELS)
    max_length = MAX_LENGTH
    constructed = True

    def __init__(self, backend="auto"):
        self.backend = resolve(backend)
        self.layers = [MultiHeadAttention.from_weights(_weights(), scale=1.0, backend=self.backend)]
        self.head_labels = {(0, h): label for h, label in enumerate(LABELS)}
        self._init_heads()

    def __repr__(self) -> str:
        return f"BuiltinModel(constructed demo, layers=1, heads={self.num_heads}, backend={self.backend!r})"

    def _embed(self, tokens: list[str]) -> np.ndarray:
        E = self.num_heads * HEAD_DIM
        x = np.zeros((len(tokens), E), np.float32)
        for i, t in enumerate(tokens):
            x[i, _P + i] = 1.0
            if t not in ("[CLS]", "[SEP]"):  # special tokens are not words: no word vector
                x[i, _R:_R + WORD_DIM] = word_vector(t)
            x[i, _FIRST] = float(i == 0)
            x[i, _DELIM] = float(t == "[SEP]" or (len(t) == 1 and not t.isalnum()))
            x[i, _ONE] = 1.0
            x[i, _LAST] = float(i == len(tokens) - 1)
        return x

    def encode(self, text: str, *, max_length: int | None = None, head_mask=None) -> Encoding:
        check_text(text)
        tokens = tokenize(text)
        limit = min(max_length or MAX_LENGTH, MAX_LENGTH)
        cut = max(0, len(tokens) - limit)
        if cut:
            tokens = tokens[:limit - 1] + ["[SEP]"]
        x = self._embed(tokens)
        y, w = self.layers[0](x, head_mask=self._layer_head_mask(head_mask, 0), return_weights=True)
        ids = np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=4).digest(), "little")
                        for t in tokens], dtype=np.int64)
        return Encoding(tokens, ids, to_numpy(y), self._full_attentions([to_numpy(w)]), cut, model=self.name,
                        head_labels=dict(self.head_labels), text=text)

    def encode_many(self, texts, **_) -> list[Encoding]:
        """:meth:`encode` of each text."""
        return [self.encode(t) for t in texts]

    def embed(self, sentences, *, head_mask=None, **_) -> np.ndarray:
        """(n, E): mean of the hidden states over tokens, L2-normalised."""
        if isinstance(sentences, str):
            sentences = [sentences]
        out = []
        for s in sentences:
            h = self.encode(s, head_mask=head_mask).hidden_states.astype(np.float64).mean(0)
            out.append(h / max(np.linalg.norm(h), 1e-12))
        return np.array(out, np.float32)
