"""Writing a decoder model as a Hugging Face folder that transformers' ``AutoModelForCausalLM`` loads.

``model.save(folder)`` writes ``config.json``, ``model.safetensors`` (float32) and the tokenizer files
of the folder the model was loaded from. The config is the source's, with this model's head counts
(``num_attention_heads``, ``num_key_value_heads``) and ``head_dim`` stated: Llama-family configs derive
head_dim as hidden_size / num_attention_heads when it is absent, which a pruned model no longer obeys.
Tensors get the family's stored names and layouts (:mod:`mha.models._layouts` inverted: fused
tensors concatenated, GPT-2's Conv1D transposed back, Gemma's 1 + w norms stored as w).

GPT-2's config cannot state fewer heads than its width allows (``c_attn`` is E x 3E, head_dim =
n_embd / n_head): a pruned GPT-2 is refused; so is a Phi-3 with LongRoPE whose hidden_size / heads no
longer equals head_dim (transformers checks the RoPE factors' length against that quotient).

The destination must be a new or empty folder; the files are written into a temporary folder beside
it and renamed into place, so an interruption leaves nothing half-written, and nothing existing is
overwritten.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import _io
from ._layouts import layout

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def check_folder(folder) -> Path:
    """The destination folder, checked before any work: new (in an existing, writable folder) or an
    empty writable folder; ValueError naming it otherwise."""
    path = Path(folder).expanduser()
    try:
        return _check_folder(path)
    except OSError as err:  # an ancestor folder that cannot be searched, a name too long, ...
        raise ValueError(f"cannot write the model to {str(path)!r}: {err.strerror or err}") from None


def _check_folder(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ValueError(f"cannot write the model to {str(path)!r}: it is a file, not a folder")
        if any(path.iterdir()):
            raise ValueError(f"cannot write the model to {str(path)!r}: the folder is not empty (nothing is "
                             f"overwritten; give a new or empty folder)")
        parent = path.resolve().parent
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write the model to {str(path)!r}: the folder is not writable")
    else:
        parent = path.absolute().parent
        if not parent.is_dir():
            what = "is not a folder" if parent.exists() else "does not exist"
            raise ValueError(f"cannot write the model to {str(path)!r}: the folder {str(parent)!r} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the model to {str(path)!r}: the folder {str(parent)!r} is not writable")
    return path


def hf_config(c, raw: dict, name: str = "the model") -> dict:
    """The source config.json ``raw`` with the head counts and head_dim of DecoderConfig ``c``;
    ValueError when the family cannot state them (a pruned GPT-2)."""
    raw = copy.deepcopy(raw)
    if c.family == "gpt2":
        if c.num_heads != raw.get("n_head") or c.num_kv_heads != c.num_heads:
            raise ValueError(f"{name}: a pruned GPT-2 cannot be saved for transformers: its config has no "
                             f"head_dim (n_embd / n_head) and c_attn is n_embd x 3 n_embd; keep every head, or "
                             f"use the model here (logits, generate)")
    else:
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if c.family == "phi3" and kind in ("longrope", "su", "yarn") and c.hidden_size // c.num_heads != c.head_dim:
            raise ValueError(f"{name}: a Phi-3 with LongRoPE and {c.num_heads} heads cannot be saved for transformers: "
                             f"it checks the long/short factors against hidden_size / num_attention_heads = "
                             f"{c.hidden_size // c.num_heads}, not head_dim = {c.head_dim}")
        raw.update(num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim)
    for key in ("dtype", "torch_dtype"):
        if key in raw:
            raw[key] = "float32"
    return raw


def hf_tensors(model) -> dict:
    """``{stored name: float32 array}`` in the family's layout, from the canonical weights."""
    w = model.canonical_weights()
    out = {}
    for stored, src in layout(model.config).items():
        parts = [w[name] for name, _ in src.targets]
        a = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if src.plus_one:
            a = a - a.dtype.type(1)
        if src.transpose:
            a = a.T
        if a.shape != src.shape:  # the layout and the weights disagree: a bug here, never a user's input
            raise RuntimeError(f"{stored}: built {a.shape}, the layout says {src.shape}")
        out[stored] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def save(model, folder) -> None:
    """Write the folder (module docstring); every check before any file is written."""
    target = check_folder(folder)
    if getattr(model, "source", None) is None:
        raise ValueError(f"{model.name} was not loaded from a folder (mha.models.load): save needs the config.json "
                         f"it came with")
    config = hf_config(model.config, model.source[1], model.name)
    tensors = hf_tensors(model)
    source = Path(model.source[0])
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.absolute().parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _io.save_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.rename(tmp, target)  # replaces an empty folder (checked) or creates the name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
