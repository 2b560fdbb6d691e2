"""The step view of a generation: one self-contained HTML page (no network) with a slider over the
steps, every layer and head at each step, and the tokens coloured by what the chosen head attended to.

The per-step attentions of :meth:`mha.models.DecoderModel.generate` (step 0 the prompt's rows, step s
the row of token P + s - 1) are one causal matrix per head: row t holds what the query at position t
attended to while predicting token t + 1. Each head's matrix is packed as the attention report packs
its weights (:mod:`mha.viz._pack`: 8-bit codes and per-row rests, deflated), whole layers first until
the page reaches its bound (8 MiB, as the report), and the page unpacks them in the browser.

Safety as the report: strings reach the page as JSON inside ``<script type="application/json">`` with
``<``, ``>`` and ``&`` escaped, and are put into the document with ``textContent`` only.
"""

from __future__ import annotations

import html
import re

import numpy as np

from . import _pack
from ._limits import HTML_BYTES, cut_note, keep_prefix
from ._report import Report, _asset, _script_json

MAX_WEIGHTS = 24_000_000  # unpacked in the browser: heads x rows x rows float32 (96 MB) at most


def causal_rows(attentions: list, prompt_length: int) -> np.ndarray:
    """(layers, H, R, R) float32 from per-step arrays (step 0 (layers, H, P, P), step s (layers, H, 1,
    P + s)), R = P + steps - 1 query positions; row t, column j: the weight of key j for query t."""
    first = np.asarray(attentions[0], np.float32)
    L, H, P = first.shape[0], first.shape[1], prompt_length
    R = P + len(attentions) - 1
    out = np.zeros((L, H, R, R), np.float32)
    out[:, :, :P, :P] = first
    for s, a in enumerate(attentions[1:], start=1):
        out[:, :, P + s - 1, :P + s] = np.asarray(a, np.float32)[:, :, 0]
    return out


def step_report(generation, *, model: str = "", backend: str = "", batch_index: int = 0,
                max_bytes: int = HTML_BYTES, roles=None) -> Report:
    """The step view of ``generation`` (a :class:`mha.models.Generation` made with ``attentions=True``).

    ``batch_index``: which row of a batched generation. Heads that do not fit ``max_bytes`` (or the
    browser's budget of weights) are left out whole layers first, and the page says so (``Report.note``).
    ``roles``: a :class:`mha.analysis.RoleTable` of the model (:func:`mha.analysis.decoder_roles`): the
    page lists every head's role with its score, chance and 95% interval, and names the chosen head's.
    A model with learned sinks shows each step's sink mass per head of the chosen layer."""
    if not generation.attentions:
        raise ValueError("the generation holds no attentions: generate(..., attentions=True)")
    batched = generation.ids.ndim == 2
    steps = [a[batch_index] if batched else a for a in generation.attentions]
    ids = generation.ids[batch_index] if batched else generation.ids
    tokens = generation.tokens[batch_index] if batched else generation.tokens
    tokens = list(tokens) if tokens else [f"t{int(i)}" for i in ids]
    P = generation.prompt_length
    rows = causal_rows(steps, P)  # (L, H, R, R)
    L, H, R = rows.shape[0], rows.shape[1], rows.shape[2]
    sink = generation.sink_mass
    if sink is not None and batched:
        sink = sink[batch_index]
    text = generation.text[batch_index] if batched and generation.text else generation.text
    meta = {"model": model, "backend": backend, "tokens": tokens, "prompt_length": P, "num_layers": L,
            "num_heads": H, "rows": R, "heads": [], "note": None, "precision": _pack.PRECISION,
            "new_text": text or "", "valid": None if generation.mask is None else
            [bool(v) for v in (generation.mask[batch_index] if batched else generation.mask)],
            "sink_mass": None if sink is None or not np.any(sink) else np.round(sink, 4).tolist(),
            "roles": None if roles is None else _roles(roles)}
    pairs = [(la, h) for la in range(L) for h in range(H)]
    heads, used = [], [len(_page(meta, tokens, P, model).encode("utf-8")) + 200]  # used[k]: with k heads
    for la, h in pairs:
        if (used[-1] > max_bytes or len(heads) * R * R > MAX_WEIGHTS) and heads:
            break  # what follows cannot be kept: no need to pack it (the first head is always kept)
        heads.append({"layer": la, "head": h, "packed": _pack.pack_head(rows[la, h])})
        used.append(used[-1] + len(_script_json(heads[-1])) + 1)
    kept = keep_prefix(pairs, lambda k: k < len(used) and used[k] <= max_bytes and k * R * R <= MAX_WEIGHTS) \
        or pairs[:1]
    limit = f"{max_bytes / 2**20:g} MiB" if max_bytes >= 2**20 else f"{max_bytes / 1024:g} KiB"
    meta["heads"] = heads[:len(kept)]
    meta["note"] = note = None if len(kept) == len(pairs) else cut_note(kept, pairs, limit) + "; choose with --layer"
    page = _page(meta, tokens, P, model)
    return Report(page, note)


def _roles(table) -> dict:
    """The role table as the page shows it: one record per query head, rounded."""
    r3 = lambda v: round(float(v), 3)  # noqa: E731
    return {"rule": table.rule, "sequences": table.sequences, "texts": table.texts,
            "heads": [{"layer": r.layer, "head": r.head, "kv_head": r.kv_head, "role": r.role, "score": r3(r.score),
                       "chance": r3(r.chance), "ci": [r3(r.ci[0]), r3(r.ci[1])], "specialised": bool(r.specialised)}
                      for r in table.heads]}


def _page(meta: dict, tokens: list, P: int, model: str) -> str:
    values = {"TITLE": html.escape("".join(tokens[:P])[:80] or model, quote=True), "CSS": _asset("steps.css"),
              "JS": _asset("steps.js"), "DATA": _script_json(meta)}
    return re.sub(r"__(TITLE|CSS|JS|DATA)__", lambda m: values[m.group(1)], _asset("steps.html"))
