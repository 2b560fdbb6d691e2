"""What a tool learns of a model folder before reading any weight: its config, whether it is a decoder,
and whether a pruning request and an output folder can be met (``mha prune --heads`` checks all of it
before the work)."""

from __future__ import annotations

from pathlib import Path

from ._checkpoint import read_json
from ._families import SUPPORTED, parse
from ._heads import pruned_config
from ._load import ENCODERS, SHIPPED, _shipped, resolve
from ._save import check_folder, hf_config

DECODER_TYPES = tuple(SUPPORTED)
ENCODER_TYPES = tuple(ENCODERS)


def read_config(name_or_path) -> tuple[Path, dict]:
    """(folder, config.json as a dict) of a shipped model name ("induction") or a folder; no weight is
    read. ValueError naming the folder or file when there is none."""
    folder = _shipped(name_or_path) if name_or_path in SHIPPED else resolve(name_or_path)[0]
    return folder, read_json(folder / "config.json", "model config")


def decoder_config(raw: dict, folder):
    """The :class:`mha.models.DecoderConfig` of a decoder's config.json ``raw`` (read from ``folder``)."""
    return parse(raw, Path(folder) / "config.json")


def pruning_plan(config, raw: dict, heads: dict, name: str = "the model") -> tuple:
    """(the pruned model's DecoderConfig, {layer: [(kv head, [query heads]) kept]}) of ``heads`` =
    ``{layer: [query heads]}``, checked against the grouped-query rule and against what the family's
    config.json can state (``raw``); ValueError saying what cannot be met."""
    new_config, kept = pruned_config(config, heads)
    hf_config(new_config, raw, name)
    return new_config, kept


def check_output_folder(folder) -> Path:
    """A folder to write a model into, checked before any work: new (in an existing, writable folder) or
    empty and writable; ValueError naming it otherwise."""
    return check_folder(folder)
