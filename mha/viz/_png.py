"""A PNG grid of heads via matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("PNG export needs matplotlib: pip install 'mha-twin[plot]'") from None
    return plt


def save_png(data: dict, path, *, columns: int = 4, dpi: int = 110) -> Path:
    """Write a grid of heat maps (one per head in ``data``) to ``path``, atomically."""
    plt = _matplotlib()
    heads = [(layer["layer"], h) for layer in data["layers"] for h in layer["heads"]]
    tokens = data["tokens"]
    n = len(tokens)
    cols = min(columns, len(heads))
    rows = math.ceil(len(heads) / cols)
    cell = max(2.6, 0.22 * n + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    fs = max(4, min(9, int(160 / max(n, 1))))
    for ax, (layer, h) in zip(axes.flat, heads):
        ax.imshow(np.asarray(h["weights"]), vmin=0.0, vmax=1.0, cmap="viridis")
        title = f"L{layer} H{h['head']}" + (f" {h['label']}" if h.get("label") else "")
        if h.get("role"):
            title += f"\n{h['role']} {h['score']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(n), tokens, rotation=90, fontsize=fs)
        ax.set_yticks(range(n), tokens, fontsize=fs)
    suptitle = f"{data['model']}" + (" (constructed demo weights)" if data.get("constructed") else "")
    fig.suptitle(suptitle + ": rows = queries, columns = keys", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _save(fig, path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (``mha._io.atomic_write``) and close it."""
    from .._io import atomic_write

    plt = _matplotlib()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return Path(path)
