"""The HTML attention report: one self-contained page (no network) with a model view, a head view and
rollout, at token or word level, that scales to 512-token texts.

What the page holds, per head: a thumbnail (the weights max-pooled to at most 64 x 64 cells, as the
10 levels of the terminal/PNG scale, for tokens and for words) and the full weights packed by
:mod:`mha.viz._pack` (8-bit codes and per-row rests, deflated), unpacked by the browser only when the
head is opened; per layer, the mean over heads and the rollout through it (:func:`mha.analysis.rollout`),
packed alike. Word-level views merge pieces in the page by :func:`mha.analysis.to_words`'s rule.

Safety: every string reaches the page as JSON inside ``<script type="application/json">`` with ``<``,
``>`` and ``&`` escaped, and is put into the document with ``textContent`` only.
"""

from __future__ import annotations

import base64
import html
import json
import re
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from ..analysis._roles import RULE
from . import _pack
from ._data import LEVELS
from ._limits import HTML_BYTES, cut_note, join_notes, keep_prefix

THUMB = 64  # thumbnail cells per side at most
_VIEWS = ("model", "head", "rollout")


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' characters at all (escaped as \\u003c etc.)."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def thumbnail(weights: np.ndarray) -> tuple[str, int]:
    """(base64 of deflated uint8 levels, side): ``weights`` (n, n) max-pooled to at most THUMB cells a
    side (a sharp diagonal survives), each cell as its level 0..9 on the shared scale."""
    w = np.asarray(weights, np.float32)
    n = w.shape[0]
    k = -(-n // THUMB)  # tokens per cell
    side = -(-n // k)
    padded = np.zeros((side * k, side * k), np.float32)
    padded[:n, :n] = w
    pooled = padded.reshape(side, k, side, k).max(axis=(1, 3))  # (side, side)
    lv = np.searchsorted(np.asarray(LEVELS, np.float32), pooled, side="right").astype(np.uint8)
    return base64.b64encode(zlib.compress(lv.tobytes(), 6)).decode("ascii"), side


def _asset(name: str) -> str:
    return resources.files("mha.viz").joinpath(f"assets/{name}").read_text(encoding="utf-8")


class Report:
    """A built report: ``html`` (the page), ``note`` (what was left out, or None), ``size`` in bytes.

    ``save(path)`` writes it atomically; in Jupyter it shows itself in a sandboxed frame."""

    def __init__(self, page: str, note: str | None):
        self.html = page
        self.note = note
        self.size = len(page.encode("utf-8"))

    def save(self, path) -> Path:
        from .._io import atomic_write

        atomic_write(path, lambda f: f.write(self.html.encode("utf-8")))
        return Path(path)

    def _repr_html_(self) -> str:
        """The page in an iframe (srcdoc; scripts run sandboxed, unable to touch the notebook), sized for a
        cell: full width, 760 px tall, scrolling inside."""
        doc = html.escape(self.html.replace("<body>", '<body class="embedded">', 1), quote=True)
        return (f'<iframe srcdoc="{doc}" sandbox="allow-scripts allow-downloads" title="attention report" '
                f'style="width:100%;height:760px;border:1px solid #ddd"></iframe>')

    def __repr__(self) -> str:
        return f"Report({self.size / 2**20:.1f} MiB{', ' + self.note if self.note else ''})"


def _heads(data: dict, spans, max_bytes: int, base: int) -> tuple[list, str | None]:
    """Packed heads of ``data`` that fit in ``max_bytes - base`` (whole layers first), and the cut note."""
    pairs = [(layer["layer"], h["head"]) for layer in data["layers"] for h in layer["heads"]]
    heads = [h for layer in data["layers"] for h in layer["heads"]]
    out, used = [], [base]
    for (layer, _), h in zip(pairs, heads):
        if used[-1] > max_bytes and out:
            break  # what follows cannot be kept: no need to pack it (the first head is always kept)
        w = np.asarray(h["weights"], np.float32)  # (n, n)
        thumb, side = thumbnail(w)
        wthumb, wside = thumbnail(_merge(w, spans)) if spans else (thumb, side)
        entry = {k: v for k, v in h.items() if k != "weights"}
        entry.update(layer=layer, thumb=thumb, side=side, wthumb=wthumb, wside=wside, packed=_pack.pack_head(w))
        out.append(entry)
        used.append(used[-1] + len(thumb) + len(wthumb) + _pack.size(entry["packed"]) + 200)
    kept = keep_prefix(pairs, lambda k: k < len(used) and used[k] <= max_bytes) or pairs[:1]
    return out[:len(kept)], cut_note(kept, pairs, f"{max_bytes // 2**20} MiB") if len(kept) < len(pairs) else None


def _merge(w: np.ndarray, spans) -> np.ndarray:
    from ..analysis._words import merge

    return merge(w, spans)


def _layer_maps(attentions: np.ndarray, residual: float, window: tuple) -> list:
    """Per layer: the mean over heads and the rollout through it (over the whole text), packed for the
    token ``window`` (start, stop). attentions: (layers, H, T, T)."""
    from ..analysis import rollout

    a, b = window
    R = rollout(attentions, residual)[:, a:b, a:b]  # (layers, n, n)
    mean = attentions[:, :, a:b, a:b].astype(np.float64).mean(1)  # (layers, n, n)
    return [{"layer": la, "mean": _pack.pack_head(mean[la]), "rollout": _pack.pack_head(R[la])}
            for la in range(attentions.shape[0])]


def build(data: dict, *, attentions=None, view: str = "model", words: bool = False, residual: float = 0.5,
          max_bytes: int = HTML_BYTES) -> Report:
    """The report page for :func:`mha.viz.to_data`'s dict (weights as arrays or lists).

    ``attentions`` (layers, heads, T, T) of the whole text adds the rollout view (for the data's token
    window); ``view`` is the view the page opens on ("model", "head" or "rollout"); ``words`` opens it at
    word level."""
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {', '.join(_VIEWS)}, got {view!r}")
    from ..analysis._words import word_spans, word_text

    tokens = list(data["tokens"])
    spans = word_spans(tokens)
    words_json = {"spans": [list(s) for s in spans], "text": word_text(tokens, spans)}
    spans = spans if len(spans) < len(tokens) else None
    start = int(data.get("token_offset") or 0)
    maps = _layer_maps(np.asarray(attentions), residual, (start, start + len(tokens))) if attentions is not None \
        else []
    base = (30_000 + len(_asset("report.js")) + len(_asset("report.css")) + 12 * sum(len(t) + 4 for t in tokens)
            + 6 * len(data.get("text", "")) + sum(len(m["mean"]["codes"]) + len(m["rollout"]["codes"]) for m in maps))
    heads, cut = _heads(data, spans, max_bytes, base)
    note = "; ".join(x for x in (data.get("note"), join_notes([cut])) if x) or None
    meta = {k: v for k, v in data.items() if k != "layers"}
    meta.update(note=note, precision=_pack.PRECISION, heads=heads, maps=maps, words=words_json, view=view,
                start_words=bool(words), residual=residual, levels=list(LEVELS), rule=RULE)
    values = {"TITLE": html.escape(data.get("text", "")[:80] or data.get("model", ""), quote=True),
              "CSS": _asset("report.css"), "JS": _asset("report.js"), "DATA": _script_json(meta)}
    page = re.sub(r"__(TITLE|CSS|JS|DATA)__", lambda m: values[m.group(1)], _asset("report.html"))
    return Report(page, note)


def _all_heads(data: dict):
    """(layers, heads, n, n) when ``data`` holds every head of every layer, in order, over the whole text
    (rollout needs them all, and a window's rows would not be the text's), else None."""
    L, H = int(data.get("num_layers") or 0), int(data.get("num_heads") or 0)
    pairs = [(layer["layer"], h["head"]) for layer in data["layers"] for h in layer["heads"]]
    whole = not data.get("token_offset") and len(data["tokens"]) == int(data.get("num_tokens") or len(data["tokens"]))
    if not L or not whole or pairs != [(la, h) for la in range(L) for h in range(H)]:
        return None
    n = len(data["tokens"])
    return np.stack([np.asarray(h["weights"], np.float32) for layer in data["layers"]
                     for h in layer["heads"]]).reshape(L, H, n, n)


def render_html(data: dict, *, view: str = "model", words: bool = False) -> str:
    """The report page for :func:`mha.viz.to_data`'s dict, at most 8 MiB (heads past it are left out,
    whole layers first, and the page says so); with rollout when ``data`` holds every head."""
    return build(data, attentions=_all_heads(data), view=view, words=words).html


def report(encoding, *, text: str | None = None, roles=None, backend: str = "", constructed: bool | None = None,
           layers=None, heads=None, tokens=None, view: str = "model", words: bool = False, residual: float = 0.5,
           max_bytes: int = HTML_BYTES, top: int = 0) -> Report:
    """The attention report of an encoding (``model.encode(text)``): model view, head view, rollout.

    Args:
        encoding: an :class:`mha.models.Encoding`.
        text, backend: shown on the page (text defaults to ``encoding.text``).
        roles: :func:`mha.analysis.head_roles` records (computed when None).
        constructed: say the weights were set by hand (default: the encoding has head labels).
        layers, heads: which heads the model and head views show (default all; rollout uses all).
        tokens: a token window, (start, stop) or "A:B" (default: the whole text; rollout still runs over
            the whole text and is shown for the window).
        view: "model", "head" or "rollout", the view it opens on; words: open at word level.
        residual: rollout's residual share; max_bytes: the page's bound.
        top: list each head's ``top`` strongest links in its head view (0: none).

    Returns:
        a :class:`Report` (``.html``, ``.note``, ``.save(path)``; shows itself in Jupyter).
    """
    from ..analysis import head_roles
    from ._data import to_data
    from ._limits import parse_window

    if roles is None:
        roles = head_roles(encoding.attentions, encoding.tokens)
    window = parse_window(tokens, len(encoding.tokens)) if isinstance(tokens, str) else tokens
    data = to_data(encoding, text=encoding.text if text is None else text, roles=roles, backend=backend,
                   layers=layers, heads=heads, tokens=window, arrays=True, top=top,
                   constructed=bool(encoding.head_labels) if constructed is None else constructed)
    return build(data, attentions=encoding.attentions, view=view, words=words, residual=residual,
                 max_bytes=max_bytes)
