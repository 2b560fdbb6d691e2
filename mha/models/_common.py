"""What every text model here returns, and name/path resolution."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Encoding:
    """One text through a model.

    tokens: list of str (L); ids: (L,) int; hidden_states: (L, E) last layer, numpy;
    attentions: (layers, heads, L, L) numpy, per head, 0-based layers and heads;
    truncated: how many tokens were cut to fit the model's limit (0 if none). In a notebook an
    encoding shows itself as the interactive attention report (``_repr_html_``).
    """

    tokens: list
    ids: np.ndarray
    hidden_states: np.ndarray
    attentions: np.ndarray
    truncated: int = 0
    model: str = ""
    head_labels: dict = field(default_factory=dict)  # {(layer, head): label} for constructed models
    text: str = ""  # the text encoded (before truncation)

    def _repr_html_(self) -> str:
        """In Jupyter: the interactive attention report (:func:`mha.viz.report`), sized for a cell."""
        from ..viz import report

        return report(self)._repr_html_()

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


class PrunableHeads:
    """Head bookkeeping shared by the models: ``head_ids[layer]`` lists the original (0-based) heads
    still present in each layer; :meth:`prune_heads` returns a smaller model, the original untouched.
    Attentions keep the original head numbering: a pruned head's slice is all zeros."""

    layers: list

    def _init_heads(self) -> None:
        self.head_ids = [list(range(layer.num_heads)) for layer in self.layers]

    @property
    def num_pruned(self) -> int:
        return sum(self.num_heads - len(ids) for ids in self.head_ids)

    def prune_heads(self, heads: dict):
        """A model without ``{layer: [heads]}`` (original 0-based numbering), by weight surgery."""
        import copy

        from .._prune import head_indices
        from .._prune import prune_heads as prune_layer

        if not isinstance(heads, dict):
            raise TypeError(f"heads must be a dict {{layer: [heads]}}, got {type(heads).__name__}")
        new = copy.copy(self)
        new.layers = list(self.layers)
        new.head_ids = [list(ids) for ids in self.head_ids]
        for layer, hs in heads.items():
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise TypeError(f"heads must be a dict {{layer: [heads]}} with int layers, got the key {layer!r} "
                                f"({type(layer).__name__})")
            if not 0 <= layer < len(self.layers):
                raise ValueError(f"layer {layer!r} is out of range: the model has {len(self.layers)} layers, "
                                 f"0 to {len(self.layers) - 1}")
            hs = head_indices(hs, f"heads[{layer}]")
            ids = new.head_ids[layer]
            gone = [h for h in hs if h not in ids]
            if gone:
                raise ValueError(f"layer {layer}: head {gone[0]} is not there (pruned already, or not one of "
                                 f"0 to {self.num_heads - 1})")
            if not hs:
                continue
            new.layers[layer] = prune_layer(new.layers[layer], [ids.index(h) for h in hs])
            new.head_ids[layer] = [h for h in ids if h not in set(hs)]
        return new

    def _layer_head_mask(self, head_mask, i):
        """This layer's slice of a (layers, original heads) head mask (numpy or mx), or None."""
        if head_mask is None:
            return None
        row = head_mask[i]
        ids = self.head_ids[i]
        if len(ids) == row.shape[0]:
            return row
        if type(row).__module__.startswith("mlx"):
            import mlx.core as mx

            return mx.take(row, mx.array(ids))
        return np.asarray(row)[ids]

    def _full_attentions(self, per_layer) -> np.ndarray:
        """(layers, original heads, L, L) from per-layer (present heads, L, L) arrays."""
        L = per_layer[0].shape[-1]
        out = np.zeros((len(per_layer), self.num_heads, L, L), dtype=np.float32)
        for i, a in enumerate(per_layer):
            out[i, self.head_ids[i]] = a
        return out
