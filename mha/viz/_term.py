"""Attention heat maps for the terminal: 256-colour cells where the terminal has colour, shading
characters where not; several heads side by side when the width allows.

One scale for both (``LEVELS``): a cell is blank only below 0.001, and weights from 0.001 to 0.02 get a
faint level of their own, so a head spread evenly over 50 or 500 tokens shows as a faint field rather
than as nothing. Labels are padded by display width (wide CJK and emoji count two columns, combining
marks none), so the rows of a panel stay aligned whatever the text.
"""

from __future__ import annotations

import textwrap

import numpy as np

from ._data import LEVELS, top_links
from ._limits import LABEL_WIDTH, char_width, display_width, term_panel

_SHADES = " .:-=+*#%@"  # one character per level, plain ASCII: readable in any terminal and in logs
_COLORS = (16, 17, 18, 19, 25, 31, 37, 43, 121, 229)  # 256-colour codes per level: black, blues, cyan, pale yellow


def levels(weights: np.ndarray) -> np.ndarray:
    """Level 0..9 of each weight (the bins of ``LEVELS``)."""
    return np.searchsorted(np.asarray(LEVELS), np.asarray(weights, np.float64), side="right")


def _label(tok: str, width: int) -> str:
    """``tok`` cut to ``width`` display columns (a '~' marks the cut) and padded to exactly ``width``."""
    tok = "".join(" " if not c.isprintable() else c for c in tok)
    if tok and char_width(tok[0]) == 0:
        tok = "\u25cc" + tok  # a lone combining mark is shown on a dotted circle, as Unicode charts do
    if display_width(tok) > width:
        out, used = "", 0
        for c in tok:
            if used + char_width(c) > width - 1:
                break
            out, used = out + c, used + char_width(c)
        tok = out + "~"
    return tok + " " * (width - display_width(tok))


def _cell(level: int, color: bool) -> str:
    import click

    return click.style("  ", bg=_COLORS[level]) if color else _SHADES[level] * 2


def _panel(head: dict, layer: int, tokens, offset: int, color: bool, label_w: int) -> tuple[list[str], int]:
    """(lines, visible width) of one head's heat map; rows and columns numbered from ``offset``."""
    lv = levels(head["weights"])
    n = len(tokens)
    title = head.get("title") or f"L{layer} H{head['head']}" + (f" {head['label']}" if head.get("label") else "")
    if head.get("role"):
        title += f" [{head['role']} {head['score']:.2f}]"
    digits = len(str(offset + n - 1))
    width, indent = term_panel(n, label_w, offset)[0], " " * (digits + 2 + label_w)
    wrapped = (textwrap.wrap(title, width) + ["", ""])[:2]  # two title lines for every panel: rows align
    lines = [line.ljust(width) for line in wrapped]
    for place in range(digits - 1, -1, -1):  # column numbers, one line per decimal place, top to bottom
        marks = [str((offset + j) // 10**place % 10) if offset + j >= 10**place or not place else " "
                 for j in range(n)]
        lines.append(indent + "".join(f"{m:<2}" for m in marks))
    for i in range(n):
        cells = "".join(_cell(int(k), color) for k in lv[i])
        lines.append(f"{offset + i:>{digits}} {_label(tokens[i], label_w)} {cells}")
    return lines, width


def legend(color: bool) -> str:
    """Two lines: where each level of the scale starts (' ' below 0.001, '.' from 0.001, ...), and
    what rows and columns are."""
    bounds = ["<.001"] + [f"{b:g}".lstrip("0") for b in LEVELS]
    keys = [f"{b} {_cell(k, True) if color else repr(_SHADES[k])}" for k, b in enumerate(bounds)]
    return "weight from: " + "  ".join(keys) + "\nrows: queries (who attends), columns: keys (attended to)"


def render_term(data: dict, *, color: bool = False, width: int = 100, top: int = 0) -> str:
    """Heat maps of every head in ``data`` (rows = queries, columns = keys), packed to ``width``, with a
    legend. Token numbers count from ``data["token_offset"]`` (0 when the whole text is shown)."""
    tokens = data["tokens"]
    offset = int(data.get("token_offset") or 0)
    label_w = min(LABEL_WIDTH, max(1, max(display_width(t) for t in tokens)))
    panels = [(_panel(h, layer["layer"], tokens, offset, color, label_w), layer["layer"], h)
              for layer in data["layers"] for h in layer["heads"]]
    out = []
    row: list = []
    used = 0

    def flush():
        if not row:
            return
        height = max(len(p[0]) for p in row)
        for k in range(height):
            out.append("   ".join(p[0][k] if k < len(p[0]) else " " * p[1] for p in row).rstrip())
        out.append("")

    for (lines, w), _, _ in panels:
        if row and used + 3 + w > width:
            flush()
            row, used = [], 0
        row.append((lines, w))
        used += (3 if used else 0) + w
    flush()
    if top:
        out.append(f"strongest links (query -> key, weight), top {top} per head:")
        for _, layer, h in panels:
            links = ", ".join(f"{tokens[i]}({offset + i}) -> {tokens[j]}({offset + j}) {w:.2f}"
                              for i, j, w in top_links(np.asarray(h["weights"]), tokens, top))
            short = f"L{layer} H{h['head']}"
            name = short if not h.get("title") or h["title"].startswith(short) else h["title"]  # custom titles shown
            out.append(f"  {name}: {links}")
    out.append(legend(color))
    if data.get("note"):
        out.append(f"note: {data['note']}")
    return "\n".join(out)
