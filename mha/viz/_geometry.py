"""The PNG grid's geometry in pixels, computed before anything is drawn (pure arithmetic, no
matplotlib): what :func:`mha.viz.plan` checks the size bound against and what :mod:`mha.viz._png`
draws by."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LABELS = 40  # tick labels per axis; past this, every k-th token
DPI = 110
_PT = DPI / 72  # pixels per typographic point


@dataclass(frozen=True)
class Grid:
    """Where everything goes, in pixels: ``cols`` x ``rows`` panels of ``img`` px heat maps, each in a cell
    of ``cell_w`` x ``cell_h`` (``title`` px above it; ``label`` px of token labels left of and below it
    if ``every_panel``, else only outside the grid's left column and bottom row), ``top`` for the
    figure's title, 130 px on the right for the colour bar."""

    width: int
    height: int
    cols: int
    rows: int
    img: int
    cell_w: int
    cell_h: int
    left: int
    top: int
    label: int
    title: int
    every_panel: bool


def ticks(tokens, offset: int):
    """(positions, labels, font size in points): every token up to MAX_LABELS, else every k-th as 'i token'."""
    n = len(tokens)
    cut = [t if len(t) <= 14 else t[:13] + "~" for t in tokens]
    if n <= MAX_LABELS:
        return list(range(n)), cut, max(4, min(9, int(160 / max(n, 1))))
    pos = list(range(0, n, math.ceil(n / 32)))
    return pos, [f"{offset + i} {cut[i]}" for i in pos], 6


def grid(tokens, heads: int, *, columns: int = 4, offset: int = 0, note: bool = False) -> Grid:
    """The image's geometry for ``heads`` panels over ``tokens``, before anything is drawn (pure arithmetic,
    no matplotlib): what the size bound is checked against."""
    n = len(tokens)
    _, labels, fs = ticks(tokens, offset)
    label = int(max((len(t) for t in labels), default=1) * fs * 0.62 * _PT) + 14  # widest label + tick + pad
    img = round(DPI * min(max(2.6, 0.22 * n + 1.2), 6.5)) - (label if n <= MAX_LABELS else 0)
    every = n <= MAX_LABELS
    title = int(2 * 9 * 1.3 * _PT) + 8  # two lines of 9 pt
    cols = max(1, min(columns, heads))
    rows = math.ceil(heads / cols)
    cell_w = img + 24 + (label if every else 0)
    cell_h = title + img + 10 + (label if every else 0)
    left, bottom = (8, 8) if every else (label + 8, label + 8)
    top = int((2 if note else 1) * 10 * 1.4 * _PT) + 16
    right = 130  # the colour bar and its labels
    return Grid(left + cols * cell_w + right, top + rows * cell_h + bottom, cols, rows, img, cell_w, cell_h,
                left, top, label, title, every)
