"""A decoder's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, with the special tokens
of ``tokenizer_config.json`` (and ``generation_config.json``'s EOS ids).

``encode(text)`` gives the ids transformers' ``AutoTokenizer(text)`` gives (the BOS token when the
tokenizer.json's post-processor adds one); ``decode(ids)`` leaves special tokens out; ``tokens(ids)``
are display labels, one per id (each id decoded alone, special tokens by name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._checkpoint import read_json
from ._tokenizer import require_tokenizers


def _content(v):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class DecoderTokenizer:
    """See the module docstring. ``folder``: the model folder; ``vocab_size``: the model's V, which
    every id of the tokenizer must be below."""

    def __init__(self, folder: Path, vocab_size: int):
        tk = require_tokenizers()
        path = folder / "tokenizer.json"
        try:
            self._tok = tk.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{path}: not a valid tokenizer.json ({str(err)[:200]})") from None
        self.path = path
        self._tok.no_padding()
        self._tok.no_truncation()
        size = self._tok.get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise ValueError(f"{path}: {size} tokens, more than the model's vocab_size={vocab_size} (config.json); "
                             f"the tokenizer belongs to another model")
        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
        self.special = {}
        for role in ("bos", "eos", "pad", "unk"):
            name = _content(cfg.get(f"{role}_token"))
            if name is None:
                continue
            tid = self._tok.token_to_id(name)
            if tid is None:
                raise ValueError(f"{cfg_path}: {role}_token {name!r} is not a token of {path.name}")
            self.special[role] = tid
        gen_path = folder / "generation_config.json"
        gen = read_json(gen_path, "generation config") if gen_path.is_file() else {}
        eos = gen.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
        self.eos_ids = tuple(sorted({int(t) for t in eos if isinstance(t, int)} | (
            {self.special["eos"]} if "eos" in self.special else set())))
        self.pad_id = self.special.get("pad")
        self._specials = {int(i) for i in self.special.values()}
        for tok in getattr(self._tok, "get_added_tokens_decoder", lambda: {})().items():
            if getattr(tok[1], "special", False):
                self._specials.add(int(tok[0]))

    def encode(self, text: str) -> np.ndarray:
        """Token ids (T,) int64 of ``text``, special tokens added as the tokenizer's post-processor says."""
        ids = self._tok.encode(text).ids
        if not ids:
            raise ValueError(f"the text {text[:40]!r} gives no tokens")
        return np.array(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        """The text of ``ids``, special tokens left out."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def tokens(self, ids) -> list:
        """One display label per id: the id decoded alone, special tokens by their name."""
        out = []
        for i in ids:
            i = int(i)
            out.append(self._tok.id_to_token(i) if i in self._specials else self._tok.decode([i]))
        return out
