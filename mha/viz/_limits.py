"""How big each export may get, and choosing what fits.

One bound per format, each chosen so that the result opens in the ordinary tool for it:

=====  ===========================================  ================================================
term   the terminal's width (two columns per key)   and 2,000 lines: tmux's default scrollback
json   32 MiB                                       Python's ``json.load`` reads it in about a second
html   8 MiB                                        a page headless Chromium opens in well under 3 s
png    16 megapixels, 8,192 px a side               under a fifth of Pillow's decompression-bomb warning (89 Mpx)
=====  ===========================================  ================================================

When what was asked for does not fit, :func:`plan` keeps a prefix of it (whole layers first, then
heads of the first layer, then a narrower token window) and says in one line what it cut and how to
choose. Token windows are ``(start, stop)``, 0-based, ``stop`` excluded, as in a Python slice.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

from ._geometry import grid

TERM_LINES = 2000
JSON_BYTES = 32 * 2**20
HTML_BYTES = 8 * 2**20
PNG_PIXELS = 16_000_000
PNG_SIDE = 8192
LABEL_WIDTH = 10  # terminal columns for a token's label


@dataclass(frozen=True)
class Plan:
    """What an export shows: ``pairs`` [(layer, head)], the token window ``tokens`` (start, stop) and
    ``note``, one line saying what was cut and how to choose (None when nothing was)."""

    pairs: list
    tokens: tuple
    note: str | None = None


def parse_window(spec: str | None, num_tokens: int) -> tuple[int, int] | None:
    """``"A:B"`` read as a Python slice of the ``num_tokens`` tokens -> (start, stop), 0 <= start < stop;
    either side may be empty, negative values count from the end, values past the end are clipped
    (``"-3:"`` is the last three tokens, ``"5:1000"`` tokens 5 to the end). None for None. A slice that
    keeps no token is a ValueError."""
    if spec is None:
        return None
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else None
        stop = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise ValueError(f"tokens must be START:STOP as a Python slice (0-based, STOP excluded, e.g. 0:40, 100: "
                         f"or -50:), got {spec!r}") from None
    if start is not None and stop is not None and (start < 0) == (stop < 0) and start >= stop:
        raise ValueError(f"tokens {spec!r} keeps no token: STOP must come after START (a Python slice, STOP "
                         f"excluded)")
    start, stop, _ = slice(start, stop).indices(num_tokens)
    if start >= stop:
        raise ValueError(f"tokens {spec!r} keeps no token of the text's {num_tokens} (tokens 0 to {num_tokens - 1}; "
                         f"a Python slice, STOP excluded)")
    return start, stop


def _describe(kept: list, asked: list) -> str:
    """'layers 0-1', 'layer 0, heads 0-4' or 'layer 2, head 7': what ``kept`` holds of ``asked``."""
    layers = sorted({layer for layer, _ in kept})
    whole = len(kept) == len(asked) or asked[len(kept)][0] != kept[-1][0]  # cut at a layer boundary
    if len(layers) > 1 or whole:
        if len(layers) == 1:
            return f"layer {layers[0]}"
        return f"layers {layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) \
            else "layers " + ", ".join(map(str, layers))
    heads = [h for _, h in kept]
    return f"layer {layers[0]}, " + (f"heads {heads[0]}-{heads[-1]}" if len(heads) > 1 else f"head {heads[0]}")


def keep_prefix(pairs: list, fits) -> list:
    """The longest prefix of ``pairs`` for which ``fits(count)`` holds (``fits`` must be monotone), cut
    at a layer boundary when at least one whole layer fits."""
    n = 0
    while n < len(pairs) and fits(n + 1):
        n += 1
    if n == len(pairs) or n == 0:
        return pairs[:n]
    ends = [i + 1 for i in range(n) if i + 1 == len(pairs) or pairs[i + 1][0] != pairs[i][0]]
    return pairs[:ends[-1]] if ends else pairs[:n]


def term_panel(n: int, label_width: int, offset: int = 0) -> tuple[int, int]:
    """(width, height) in terminal cells of one head's heat map over tokens offset..offset+n-1: the
    row number, the label and two columns per key; two title lines, a line per digit of the column
    numbers, a row per query and a blank line."""
    digits = len(str(offset + n - 1))
    return digits + 2 + label_width + 2 * n, 2 + digits + n + 1


def _term_cost(n: int, heads: int, width: int, label_width: int, offset: int) -> int:
    w, h = term_panel(n, label_width, offset)
    per_row = max(1, (width + 3) // (w + 3))
    return math.ceil(heads / per_row) * h


def _json_cost(n: int, heads: int) -> int:
    # "0.123456," is the longest a weight rounded to 6 decimals prints; "[" and "]," per row
    return heads * (9 * n * n + 3 * n + 160)


def _png_fits(tokens: list, heads: int, note: bool) -> bool:
    g = grid(tokens, heads, note=note)
    return g.width <= PNG_SIDE and g.height <= PNG_SIDE and g.width * g.height <= PNG_PIXELS


def plan(fmt: str, tokens: list, pairs: list, *, window=None, width: int = 120) -> Plan:
    """What of ``pairs`` and of the token ``window`` ((start, stop) or "A:B"; default: all) an export
    in ``fmt`` can show.

    ``fmt``: "term", "json", "png" or "html" (html is bounded when it is written: its weights are
    compressed, so only the writer knows their size; see :mod:`mha.viz._html`)."""
    total = len(tokens)
    start, stop = (parse_window(window, total) if isinstance(window, str) else window) or (0, total)
    notes = []
    if fmt == "term":
        label_w = min(LABEL_WIDTH, max(1, max(display_width(t) for t in tokens[start:stop])))
        digits = len(str(total - 1))
        fit_n = max(1, (width - digits - 2 - label_w) // 2)
        if stop - start > fit_n:
            notes.append(f"showing tokens {start}-{start + fit_n - 1} of {total} (what fits {width} columns)")
            stop = start + fit_n
        n = stop - start
        kept = keep_prefix(pairs, lambda k: _term_cost(n, k, width, label_w, start) <= TERM_LINES)
        limit = f"{TERM_LINES:,} lines"
    elif fmt == "json":
        n_max = math.isqrt(JSON_BYTES // 10)  # one head over more tokens than this would pass the bound
        if stop - start > n_max:
            notes.append(f"showing tokens {start}-{start + n_max - 1} of {total} (one head over more would pass "
                         f"{JSON_BYTES // 2**20} MiB)")
            stop = start + n_max
        kept = keep_prefix(pairs, lambda k: _json_cost(stop - start, k) <= JSON_BYTES)
        limit = f"{JSON_BYTES // 2**20} MiB"
    elif fmt == "png":
        kept = keep_prefix(pairs, lambda k: _png_fits(tokens[start:stop], k, note=True))
        limit = f"{PNG_PIXELS // 10**6} megapixels"
    elif fmt == "html":
        kept, limit = list(pairs), ""
    else:
        raise ValueError(f"fmt must be one of 'term', 'json', 'png', 'html', got {fmt!r}")
    if not kept:
        kept = pairs[:1]
    if len(kept) < len(pairs):
        notes.append(cut_note(kept, pairs, limit))
    return Plan(kept, (start, stop), join_notes(notes))


def cut_note(kept: list, asked: list, limit: str) -> str:
    """'showing layers 0-1 (24 of 72 heads) to stay within LIMIT'."""
    return f"showing {_describe(kept, asked)} ({len(kept)} of {len(asked)} heads) to stay within {limit}"


def join_notes(notes) -> str | None:
    """The notes as one line that ends by saying how to choose, or None when there are none."""
    notes = [n for n in notes if n]
    return "; ".join(notes) + "; choose with --layer, --head, --tokens A:B" if notes else None


def char_width(c: str) -> int:
    """Terminal columns of one character: 0 for combining marks, variation selectors and zero-width
    characters, 2 for East Asian wide and full-width characters (CJK, most emoji), else 1."""
    if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes (:func:`char_width` summed)."""
    return sum(char_width(c) for c in text)
