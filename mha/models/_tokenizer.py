"""WordPiece tokenisation with the ``tokenizers`` library (the ``text`` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def require_tokenizers():
    """The tokenizers library (pretrained models need it), or ImportError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise ImportError("loading a pretrained model needs the tokenizers library: pip install tokenizers "
                          "(or the text extra: pip install 'mha-twin[text]')") from None
    return tokenizers


class WordPiece:
    """A BERT tokenizer from tokenizer.json (or vocab.txt), without padding, truncating at ``max_length``."""

    def __init__(self, folder: Path, *, lowercase: bool = True, max_length: int = 512, vocab_size: int | None = None):
        tk = require_tokenizers()
        path = folder / "tokenizer.json"
        if not path.is_file():
            path = folder / "vocab.txt"
            if not path.is_file():
                raise ValueError(f"{folder}: no tokenizer.json or vocab.txt")
        try:
            if path.name == "tokenizer.json":
                self._tok = tk.Tokenizer.from_file(str(path))
            else:
                self._tok = tk.BertWordPieceTokenizer(str(path), lowercase=lowercase)._tokenizer
        except Exception as err:  # tokenizers raises a bare Exception (or TypeError) for a bad file
            raise ValueError(f"{path}: not a valid {path.name} ({str(err)[:200]})") from None
        self.path = path
        size = self._tok.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and size > vocab_size:
            raise ValueError(f"{path}: {size} tokens, more than the model's vocab_size={vocab_size} (config.json); "
                             f"the tokenizer belongs to another model")
        self._tok.no_padding()  # the shipped tokenizer.json pads every input to 128
        self._tok.no_truncation()
        self.max_length = max_length
        self.pad_id = self._tok.token_to_id("[PAD]") or 0

    def encode(self, text: str, max_length: int | None = None):
        """(tokens, ids (L,), number of tokens cut off)."""
        limit = max_length or self.max_length
        enc = self._tok.encode(text)
        cut = max(0, len(enc.ids) - limit)
        if cut:
            self._tok.enable_truncation(limit)
            enc = self._tok.encode(text)
            self._tok.no_truncation()
        return list(enc.tokens), np.array(enc.ids, dtype=np.int64), cut

    def encode_batch(self, texts, max_length: int | None = None):
        """(ids (n, L) padded, mask (n, L) bool) for a list of texts."""
        rows = [self.encode(t, max_length)[1] for t in texts]
        L = max(len(r) for r in rows)
        ids = np.full((len(rows), L), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), L), dtype=bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = True
        return ids, mask
