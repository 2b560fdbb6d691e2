"""BERT-family encoders (BERT, MiniLM) with every attention layer an ``mha`` MultiHeadAttention.

Post-LayerNorm encoder: absolute position and token-type embeddings, exact-erf GELU, LayerNorm. Weights
are read from ``model.safetensors`` by this project's own reader (no pickle), tokenisation is the
``tokenizers`` library. The numbers match Hugging Face transformers' eager BERT to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _io
from .._backends import resolve, to_numpy
from .._layer import MultiHeadAttention
from .._reference import linear
from .._weights import AttentionWeights
from ._checks import check_tensors
from ._common import Encoding, PrunableHeads, check_text
from ._ops import gelu, layer_norm

OPTIONAL_PREFIXES = ("bert.", "model.")


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        """The config from a Hugging Face ``config.json``; ValueError naming the file when it is not one."""
        raw = _io.read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the model config must be a JSON object, got a {type(raw).__name__}")
        if raw.get("model_type", "bert") not in ("bert",):
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not a BERT-family encoder")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        if raw.get("hidden_act", "gelu") not in ("gelu",):
            raise ValueError(f"{path}: hidden_act {raw.get('hidden_act')!r} is not supported (only 'gelu')")
        missing = [k for k in _SIZES[:-1] if k not in raw]
        if missing:
            raise ValueError(f"{path}: the config lacks {missing[0]!r}")
        sizes = {k: raw.get(k, 2) for k in _SIZES}
        bad = [f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        eps = raw.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            bad.append(f"layer_norm_eps={eps!r}")
        if bad:
            raise ValueError(f"{path}: {', '.join(bad)} in the config: sizes must be positive ints and "
                             f"layer_norm_eps a number in [0, 1)")
        if sizes["hidden_size"] % sizes["num_attention_heads"]:
            raise ValueError(f"{path}: hidden_size={sizes['hidden_size']} is not a multiple of "
                             f"num_attention_heads={sizes['num_attention_heads']}")
        return cls(*sizes.values(), float(eps), raw.get("hidden_act", "gelu"))


_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
          "max_position_embeddings", "type_vocab_size")  # the fields of BertConfig in order; the last defaults to 2


def _expected_shapes(c: BertConfig) -> dict:
    E, F = c.hidden_size, c.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (c.vocab_size, E),
        "embeddings.position_embeddings.weight": (c.max_position_embeddings, E),
        "embeddings.token_type_embeddings.weight": (c.type_vocab_size, E),
        "embeddings.LayerNorm.weight": (E,), "embeddings.LayerNorm.bias": (E,),
    }
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (E, E), (E,)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (E,), (E,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (F, E), (F,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (E, F), (E,)
    return shapes


# Parts of BERT checkpoints that the encoder does not use: the pooler, pre-training heads, the position-id buffer.
UNUSED = (r"pooler\.", r"cls\.", r"embeddings\.position_ids$")


def read_weights(path: Path, config: BertConfig) -> dict:
    """The encoder's tensors from a safetensors file, prefix-stripped and checked against the config key
    by key (:func:`mha.models._checks.check_tensors`: layer count, missing, unexpected, shapes)."""
    tensors, _ = _io.load_arrays(path)
    for prefix in OPTIONAL_PREFIXES:
        if any(k.startswith(prefix + "embeddings.") for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = _expected_shapes(config)
    check_tensors(path, tensors, expected, ignored=UNUSED,
                  layers=(config.num_hidden_layers, "num_hidden_layers", r"encoder\.layer\.(\d+)\."))
    return {k: np.asarray(tensors[k], np.float32) for k in expected}


class BertModel(PrunableHeads):
    """A BERT-family encoder running on this project's attention (numpy or MLX backend).

    ``encode(text)`` -> :class:`Encoding` (tokens, last hidden states, per-head attentions);
    ``embed(sentences)`` -> (n, E) mean-pooled, L2-normalised sentence embeddings.
    """

    def __init__(self, config: BertConfig, weights: dict, tokenizer, *, backend="auto", name: str = "bert",
                 embed_max_length: int = 256):
        self.config = config
        self.name = name
        self.backend = resolve(backend)
        self.tokenizer = tokenizer
        self.embed_max_length = embed_max_length
        if self.backend == "mlx":
            import mlx.core as mx

            self._xp, native = mx, mx.array
        else:
            self._xp, native = np, (lambda a: a)
        self._w = {k: native(v) for k, v in weights.items() if ".attention.self." not in k
                   and ".attention.output.dense." not in k}
        self.layers = []
        H = config.num_attention_heads
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}.attention."
            aw = AttentionWeights(*(weights[p + n + ".weight"] for n in ("self.query", "self.key", "self.value",
                                                                         "output.dense")),
                                  *(weights[p + n + ".bias"] for n in ("self.query", "self.key", "self.value",
                                                                       "output.dense")), num_heads=H)
            self.layers.append(MultiHeadAttention.from_weights(aw, backend=self.backend))
        self._init_heads()

    def to(self, backend):
        """The same model (pruning included) on another backend."""
        import copy

        new = copy.copy(self)
        new.backend = resolve(backend)
        if new.backend == "mlx":
            import mlx.core as mx

            new._xp, native = mx, mx.array
        else:
            new._xp, native = np, np.asarray
        new._w = {k: native(to_numpy(v)) for k, v in self._w.items()}
        new.layers = [layer.to(new.backend) for layer in self.layers]
        return new

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def max_length(self) -> int:
        return min(self.config.max_position_embeddings, self.tokenizer.max_length)

    def __repr__(self) -> str:
        c = self.config
        pruned = f", pruned={self.num_pruned}" if self.num_pruned else ""
        return (f"BertModel({self.name!r}, layers={c.num_hidden_layers}, heads={c.num_attention_heads}{pruned}, "
                f"hidden={c.hidden_size}, backend={self.backend!r})")

    def forward(self, ids, mask, *, return_attentions=False, head_mask=None):
        """ids, mask (B, L) -> hidden states (B, L, E) native, and per-layer weights (B, H, L, L) if asked.

        ``head_mask``: (layers, H) multipliers on each head's context (0 removes a head); numpy, or an
        mx.array on the MLX backend (then gradients flow to it: head importance by autodiff)."""
        xp, w = self._xp, self._w
        c = self.config
        ids_n = xp.array(ids) if xp is not np else ids
        mask_n = xp.array(mask) if xp is not np else mask
        L = ids.shape[1]
        x = (xp.take(w["embeddings.word_embeddings.weight"], ids_n, axis=0)
             + w["embeddings.position_embeddings.weight"][:L]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = layer_norm(xp, x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], c.layer_norm_eps)
        attentions = []
        for i, attn in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            hm = self._layer_head_mask(head_mask, i)
            res = attn(x, key_mask=mask_n, head_mask=hm, return_weights=return_attentions)
            a = res[0] if return_attentions else res
            if return_attentions:
                attentions.append(res[1])
            x = layer_norm(xp, a + x, w[p + "attention.output.LayerNorm.weight"],
                           w[p + "attention.output.LayerNorm.bias"], c.layer_norm_eps)
            h = gelu(xp, linear(xp, x, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"]))
            h = linear(xp, h, w[p + "output.dense.weight"], w[p + "output.dense.bias"])
            x = layer_norm(xp, h + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                           c.layer_norm_eps)
        return x, attentions

    def encode(self, text: str, *, max_length: int | None = None, head_mask=None) -> Encoding:
        """Tokens, last-layer hidden states (L, E) and attentions (layers, H, L, L) for one text.
        Text longer than ``max_length`` (default: the model's limit) is truncated; ``.truncated`` says
        by how many tokens."""
        check_text(text)
        tokens, ids, cut = self.tokenizer.encode(text, min(max_length or self.max_length, self.max_length))
        hidden, atts = self.forward(ids[None], np.ones((1, len(ids)), bool), return_attentions=True,
                                    head_mask=head_mask)
        return Encoding(tokens, ids, to_numpy(hidden)[0], self._full_attentions([to_numpy(a)[0] for a in atts]),
                        cut, model=self.name, text=text)

    def encode_many(self, texts, *, batch_size: int = 32, max_length: int | None = None) -> list[Encoding]:
        """:meth:`encode` of each text, batched: texts sorted by length share padded forward passes (the
        padding hidden by ``key_mask``), the same numbers as one at a time to float32 rounding."""
        for i, t in enumerate(texts):
            check_text(t, f"texts[{i}]")
        limit = min(max_length or self.max_length, self.max_length)
        pieces = [self.tokenizer.encode(t, limit) for t in texts]  # (tokens, ids (L_i,), cut)
        order = sorted(range(len(texts)), key=lambda i: len(pieces[i][1]))
        out: list = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            L = max(len(pieces[i][1]) for i in chunk)
            ids = np.full((len(chunk), L), self.tokenizer.pad_id, dtype=np.int64)  # (b, L)
            mask = np.zeros((len(chunk), L), dtype=bool)  # (b, L): True for real tokens
            for b, i in enumerate(chunk):
                ids[b, :len(pieces[i][1])], mask[b, :len(pieces[i][1])] = pieces[i][1], True
            hidden, atts = self.forward(ids, mask, return_attentions=True)
            hidden, atts = to_numpy(hidden), [to_numpy(a) for a in atts]  # (b, L, E), layers x (b, H, L, L)
            for b, i in enumerate(chunk):
                tokens, tids, cut = pieces[i]
                n = len(tids)
                out[i] = Encoding(tokens, tids, hidden[b, :n], self._full_attentions([a[b, :, :n, :n] for a in atts]),
                                  cut, model=self.name, text=texts[i])
        return out

    def embed(self, sentences, *, batch_size: int = 32, max_length: int | None = None, head_mask=None) -> np.ndarray:
        """(n, E) sentence embeddings: mean of the last hidden states over real tokens, L2-normalised
        (the sentence-transformers recipe; sequences cut at 256 tokens like its max_seq_length)."""
        if isinstance(sentences, str):
            sentences = [sentences]
        for i, s in enumerate(sentences):
            check_text(s, f"sentences[{i}]")
        limit = min(max_length or self.embed_max_length, self.max_length)
        out = []
        for start in range(0, len(sentences), batch_size):
            ids, mask = self.tokenizer.encode_batch(sentences[start:start + batch_size], limit)
            hidden, _ = self.forward(ids, mask, head_mask=head_mask)
            h = to_numpy(hidden).astype(np.float64)
            m = mask[..., None].astype(np.float64)
            pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12))
        return np.concatenate(out).astype(np.float32)
