"""One plain-data view of an encoding, shared by every renderer (JSON, HTML, terminal, PNG)."""

from __future__ import annotations

import json

import numpy as np

FORMAT = "mha-twin/attention/1"
# One scale for the terminal and the PNG: level k (1..9) starts at LEVELS[k - 1]; level 0 is below 0.001.
# Fine steps at the bottom, so that a head spread over 50 or 500 tokens is a faint field, not nothing.
LEVELS = (0.001, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def selection(num_layers: int, num_heads: int, layers=None, heads=None) -> list[tuple[int, int]]:
    """(layer, head) pairs chosen by ``layers``/``heads`` (None = all); 0-based; range-checked."""
    layers = list(range(num_layers)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    heads = list(range(num_heads)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
    for name, vals, n in (("layer", layers, num_layers), ("head", heads, num_heads)):
        bad = [v for v in vals if not 0 <= v < n]
        if bad:
            raise ValueError(f"{name} {bad[0]} is out of range: the model has {n} {name}s, numbered 0 to {n - 1}")
    return [(layer, head) for layer in layers for head in heads]


def to_data(encoding, *, text: str = "", roles=None, backend: str = "", layers=None, heads=None,
            constructed: bool = False, pairs=None, tokens=None, note=None, arrays: bool = False,
            titles=None, top: int = 0) -> dict:
    """A JSON-ready dict: tokens and, per selected head, its weights (rows = queries), label and role.

    ``pairs`` (a list of (layer, head)) overrides ``layers``/``heads``; ``tokens`` = (start, stop) keeps
    the weights among those tokens only (a square window: rows then sum to less than 1 where they attend
    outside it); ``note`` says what an export left out. ``arrays=True`` keeps each head's weights as a
    float32 (T, T) array instead of lists (for the renderers; not JSON-ready). ``titles`` {(layer, head):
    str} replaces a panel's default title "L{layer} H{head} {label}" (e.g. for rollout). ``top`` > 0 adds
    each head's ``top`` strongest links, ``"top": [[query, key, weight], ...]`` (token numbers of the whole
    text), strongest first.
    """
    roles = {(r.layer, r.head): r for r in roles or []}
    chosen = list(pairs) if pairs is not None else selection(encoding.num_layers, encoding.num_heads, layers, heads)
    total = len(encoding.tokens)
    start, stop = tokens or (0, total)
    out_layers: dict = {}
    for layer, head in chosen:
        r = roles.get((layer, head))
        w = encoding.attentions[layer, head, start:stop, start:stop]
        label = encoding.head_labels.get((layer, head))
        links = [[start + i, start + j, round(v, 6)] for i, j, v in top_links(w, None, top)] if top else None
        out_layers.setdefault(layer, []).append({
            "head": head,
            "title": (titles or {}).get((layer, head)) or f"L{layer} H{head}" + (f" {label}" if label else ""),
            "label": encoding.head_labels.get((layer, head)),
            "role": r.role if r else None,
            "score": round(float(r.score), 4) if r else None,
            "weights": np.array(w, np.float32) if arrays else np.round(w.astype(np.float64), 6).tolist(),
            **({"top": links} if top else {}),
        })
    return {
        "format": FORMAT, "model": encoding.model, "constructed": bool(constructed), "backend": backend,
        "text": text, "tokens": list(encoding.tokens[start:stop]), "token_offset": int(start),
        "num_tokens": int(total), "truncated": int(encoding.truncated),
        "num_layers": int(encoding.num_layers), "num_heads": int(encoding.num_heads), "note": note,
        "layers": [{"layer": layer, "heads": hs} for layer, hs in out_layers.items()],
    }


def to_json(data: dict) -> str:
    """JSON text (a JSON encoder, never string concatenation), compact: no indentation, since a matrix
    with a number per line is unreadable anyway and took 300 MB and a minute at 512 tokens."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def from_json(text: str) -> dict:
    """Parse what :func:`to_json` wrote, checking the format tag."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not an mha-twin attention export (format tag {FORMAT!r} missing)")
    return data


def top_links(weights: np.ndarray, tokens, k: int):
    """The k strongest (from, to, weight) links of one head, strongest first."""
    flat = np.argsort(-np.asarray(weights).ravel(), kind="stable")[:k]  # ties: earlier query first
    return [(int(i), int(j), float(weights[i, j])) for i, j in zip(*np.unravel_index(flat, weights.shape))]
