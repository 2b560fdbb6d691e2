"""Attention heat maps for the terminal: 256-colour cells where the terminal has colour, shading
characters where not; several heads side by side when the width allows."""

from __future__ import annotations

import textwrap

import numpy as np

from ._data import top_links

_SHADES = " .:-=+*#%@"  # 10 levels, plain ASCII: readable in any terminal and in logs
_RAMP = [16, 17, 18, 19, 20, 26, 32, 38, 44, 50, 86, 122, 158, 194, 230]  # dark blue -> cyan -> pale yellow


def _label(tok: str, width: int) -> str:
    tok = tok.replace("\n", " ")
    return tok if len(tok) <= width else tok[: width - 1] + "~"


def _panel(head: dict, layer: int, tokens, color: bool, label_w: int) -> tuple[list[str], int]:
    """(lines, visible width) of one head's heat map."""
    import click

    W = np.asarray(head["weights"])
    n = len(tokens)
    title = f"L{layer} H{head['head']}"
    if head.get("label"):
        title += f" {head['label']}"
    if head.get("role"):
        title += f" [{head['role']} {head['score']:.2f}]"
    width = 3 + label_w + 1 + 2 * n
    wrapped = (textwrap.wrap(title, width) + ["", ""])[:2]  # two title lines for every panel: rows align
    lines = [line.ljust(width) for line in wrapped]
    if n > 10:
        lines.append(" " * (4 + label_w) + "".join(f"{j // 10 if j >= 10 else ' ':<2}" for j in range(n)))
    lines.append(" " * (4 + label_w) + "".join(f"{j % 10:<2}" for j in range(n)))
    for i in range(n):
        cells = []
        for j in range(n):
            w = float(W[i, j])
            if color:
                cells.append(click.style("  ", bg=_RAMP[min(int(w * len(_RAMP)), len(_RAMP) - 1)]))
            else:
                ch = _SHADES[min(int(w * len(_SHADES)), len(_SHADES) - 1)]
                cells.append(ch * 2)
        lines.append(f"{i:>2} {_label(tokens[i], label_w):<{label_w}} " + "".join(cells))
    return lines, width


def render_term(data: dict, *, color: bool = False, width: int = 100, top: int = 0) -> str:
    """Heat maps of every head in ``data`` (rows = queries, columns = keys), packed to ``width``."""
    tokens = data["tokens"]
    label_w = min(10, max(len(t) for t in tokens))
    panels = [(_panel(h, layer["layer"], tokens, color, label_w), layer["layer"], h)
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
            links = ", ".join(f"{tokens[i]}({i}) -> {tokens[j]}({j}) {w:.2f}"
                              for i, j, w in top_links(np.asarray(h["weights"]), tokens, top))
            out.append(f"  L{layer} H{h['head']}: {links}")
    if not color:
        out.append(f"shading: '{_SHADES}' = weight 0 ... 1")
    return "\n".join(out)
