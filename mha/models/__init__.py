"""Attention on real text: BERT-family encoders through this project's attention, and a built-in
constructed demo model that needs no download.

    model = mha.models.load_bert("minilm")          # or a folder with config.json, model.safetensors, tokenizer.json
    enc = model.encode("The cat sat on the mat.")   # .tokens, .hidden_states (L, E), .attentions (layers, H, L, L)
    emb = model.embed(["a sentence", "another"])    # (n, E) mean-pooled, L2-normalised
    demo = mha.models.load_model("builtin")         # hand-set heads: previous, next, self, first, ...
"""

from ._bert import BertConfig, BertModel
from ._builtin import BuiltinModel
from ._common import Encoding
from ._load import load_bert, load_model, resolve
from ._tokenizer import require_tokenizers

__all__ = ["BertConfig", "BertModel", "BuiltinModel", "Encoding", "load_bert", "load_model", "require_tokenizers",
           "resolve"]
