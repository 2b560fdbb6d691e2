"""A PNG grid of heads via matplotlib (the ``plot`` extra).

Bounded: :func:`grid` gives the image's size before anything is drawn, and :func:`save_png` refuses
data past ``PNG_PIXELS`` / ``PNG_SIDE`` (``mha demo`` chooses what fits first and says what it left
out). Past 40 tokens a panel labels every k-th token only (about 32 labels remain), and only the
panels of the grid's left column and bottom row carry labels (every panel shows the same tokens): a
512-token head is a 715 px heat map with readable labels rather than 512 unreadable ones, and 24 such
panels draw in seconds. Colours follow the terminal view's levels (finer near 0, so a head spread over
hundreds of tokens is not black), with one colour bar for all panels. Every position is computed, not
left to a layout engine, so the title sits above the panels and nothing overlaps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._data import LEVELS
from ._geometry import DPI, grid, ticks
from ._limits import PNG_PIXELS, PNG_SIDE


def pyplot():
    """matplotlib.pyplot on the Agg backend, or ImportError saying how to install it (the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("PNG export needs matplotlib: pip install 'mha-twin[plot]'") from None
    return plt


def figure(data: dict, *, columns: int = 4):
    """:func:`_figure`, with text taken literally: a token or a folder name such as ``$\\frac$`` is not
    read as matplotlib mathtext (where it raised)."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        return _figure(data, columns=columns)


def _figure(data: dict, *, columns: int = 4):
    """The matplotlib figure :func:`save_png` writes: one heat map per head in ``data``, a shared colour
    bar, the title (and ``data["note"]``, if any) above the panels, every position computed by
    :func:`grid` (no layout engine: nothing can overlap, and 24 panels of 512 tokens draw in seconds).
    Raises ValueError past the bounds."""
    plt = pyplot()
    from matplotlib.colors import BoundaryNorm

    heads = [(layer["layer"], h) for layer in data["layers"] for h in layer["heads"]]
    tokens, offset = data["tokens"], int(data.get("token_offset") or 0)
    n = len(tokens)
    g = grid(tokens, len(heads), columns=columns, offset=offset, note=bool(data.get("note")))
    if g.width > PNG_SIDE or g.height > PNG_SIDE or g.width * g.height > PNG_PIXELS:
        raise ValueError(f"a PNG of {len(heads)} heads over {n} tokens would be {g.width}x{g.height} px, past "
                         f"{PNG_PIXELS // 10**6} megapixels or {PNG_SIDE} px a side; choose fewer heads or tokens")
    fig = plt.figure(figsize=(g.width / DPI, g.height / DPI), dpi=DPI)
    W, H = g.width, g.height
    pos, labels, fs = ticks(tokens, offset)
    norm = BoundaryNorm((0.0, *LEVELS, 1.0), 256)  # the terminal's levels: small weights stay visible
    image = None
    for k, (layer, h) in enumerate(heads):
        r, c = divmod(k, g.cols)
        x = g.left + c * g.cell_w + 12 + (g.label if g.every_panel else 0)  # the image's left edge
        y = g.top + r * g.cell_h + g.title  # its top edge, from the top
        ax = fig.add_axes((x / W, 1 - (y + g.img) / H, g.img / W, g.img / H))
        image = ax.imshow(np.asarray(h["weights"], np.float32), norm=norm, cmap="viridis", aspect="auto",
                          interpolation="nearest" if n <= 200 else "antialiased")
        title = h.get("title") or f"L{layer} H{h['head']}" + (f" {h['label']}" if h.get("label") else "")
        if h.get("role"):
            title += f"\n{h['role']} {h['score']:.2f}"
        ax.set_title(title, fontsize=9)
        show_x = g.every_panel or r == g.rows - 1 or k + g.cols >= len(heads)
        ax.set_xticks(pos if show_x else [], labels if show_x else [], rotation=90, fontsize=fs)
        ax.set_yticks(pos if g.every_panel or c == 0 else [], labels if g.every_panel or c == 0 else [],
                      fontsize=fs)
    if image is not None:
        span = min(g.rows, 3) * g.cell_h - 40
        cax = fig.add_axes(((W - 118) / W, 1 - (g.top + 30 + span) / H, 18 / W, span / H))
        bar = fig.colorbar(image, cax=cax, spacing="uniform", label="attention weight (terminal view's levels)")
        bar.set_ticks((0.0, *LEVELS, 1.0), labels=["0", *(f"{b:g}" for b in LEVELS), "1"])
    title = f"{data['model']}" + (" (constructed demo weights)" if data.get("constructed") else "")
    title += ": rows = queries, columns = keys"
    if offset or n < int(data.get("num_tokens") or n):
        title += f"; tokens {offset}-{offset + n - 1} of {data['num_tokens']}"
    if data.get("note"):
        title += f"\n{data['note']}"
    fig.suptitle(title, fontsize=10, y=1 - 8 / H, va="top")
    return fig


def save_png(data: dict, path, *, columns: int = 4, dpi: float = DPI) -> Path:
    """Write a grid of heat maps (one per head in ``data``) to ``path``, atomically; see :func:`figure`.
    ``dpi`` other than 110 scales the image; whatever the dpi, an image past ``PNG_PIXELS`` or
    ``PNG_SIDE`` is a ValueError before anything is drawn. The destination is checked
    (``mha.io.check_writable``) before the figure is drawn."""
    from .._write import check_writable

    _check_dpi(dpi)
    check_writable(path)
    return save_figure(figure(data, columns=columns), path, dpi)


def _check_dpi(dpi) -> None:
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not math.isfinite(dpi) or dpi <= 0:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")


def save_figure(fig, path, dpi: float = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (``mha.io.atomic_write``) and close it. Text is taken
    literally (no mathtext). An image past ``PNG_PIXELS`` (16 megapixels) or ``PNG_SIDE`` px a side at
    this ``dpi`` is a ValueError, raised before drawing (dpi 1100 had drawn 489 megapixels in 3.4 GB;
    dpi 5000 died with std::bad_alloc)."""
    import matplotlib

    from .._io import atomic_write

    plt = pyplot()
    try:
        _check_dpi(dpi)
        w, h = (round(v * dpi) for v in fig.get_size_inches())
        if w > PNG_SIDE or h > PNG_SIDE or w * h > PNG_PIXELS:
            raise ValueError(f"a PNG of {w}x{h} px at dpi {dpi:g} is past {PNG_PIXELS // 10**6} megapixels or "
                             f"{PNG_SIDE} px a side; lower the dpi or show less")
        with matplotlib.rc_context({"text.parse_math": False}):
            atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return Path(path)
