"""Attention on real text: BERT-family encoders through this project's attention, and a built-in
constructed demo model that needs no download.

    model = mha.models.load_bert("minilm")          # or a folder with config.json, model.safetensors, tokenizer.json
    enc = model.encode("The cat sat on the mat.")   # .tokens, .hidden_states (L, E), .attentions (layers, H, L, L)
    emb = model.embed(["a sentence", "another"])    # (n, E) mean-pooled, L2-normalised
    demo = mha.models.load_model("builtin")         # hand-set heads: previous, next, self, first, ...

Decoders (Llama, Mistral, Qwen 2/3, Gemma 1/2/3, Phi-3, GPT-2 folders; docs/decoders.md):

    model = mha.models.load("path/to/folder")       # any Hugging Face folder with config.json + safetensors
    out = model.generate("The cat", 20, attentions=True)   # .ids, .text, .attentions per step
"""

from ._bert import BertConfig, BertModel
from ._builtin import BuiltinModel
from ._common import Encoding
from ._decoder import DecoderModel
from ._decoder_config import DecoderConfig
from ._folders import (DECODER_TYPES, ENCODER_TYPES, check_output_folder, decoder_config, pruning_plan,
                       read_config)
from ._generate import Generation
from ._load import load, load_bert, load_model, resolve
from ._tokenizer import require_tokenizers

__all__ = ["BertConfig", "BertModel", "BuiltinModel", "DECODER_TYPES", "DecoderConfig", "DecoderModel", "ENCODER_TYPES",
           "Encoding", "Generation", "check_output_folder", "decoder_config", "load", "load_bert", "load_model",
           "pruning_plan", "read_config", "require_tokenizers", "resolve"]
