"""What every text model here returns, and name/path resolution."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Encoding:
    """One text through a model.

    tokens: list of str (L); ids: (L,) int; hidden_states: (L, E) last layer, numpy;
    attentions: (layers, heads, L, L) numpy, per head, 0-based layers and heads;
    truncated: how many tokens were cut to fit the model's limit (0 if none).
    """

    tokens: list
    ids: np.ndarray
    hidden_states: np.ndarray
    attentions: np.ndarray
    truncated: int = 0
    model: str = ""
    head_labels: dict = field(default_factory=dict)  # {(layer, head): label} for constructed models

    @property
    def num_layers(self) -> int:
        return self.attentions.shape[0]

    @property
    def num_heads(self) -> int:
        return self.attentions.shape[1]


def check_text(text, name: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty (or only whitespace); give some words to attend over")
    return text
