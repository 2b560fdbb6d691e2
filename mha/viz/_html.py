"""A self-contained HTML head view (bertviz-like, no network, no Jupyter).

Tokens on the left (queries) and right (keys), a line from each query to each key with opacity = weight,
one colour per head; a layer selector and head toggles; hovering a token shows only its lines and
shades the tokens it attends to (or, on the right, those attending to it).

Safety: every string from the text or the model reaches the page only as JSON inside a
``<script type="application/json">`` block, with ``<``, ``>`` and ``&`` escaped, and is put into the page
by ``textContent``: a token such as ``<script>`` shows as text and never runs.
"""

from __future__ import annotations

import html
import json
import re

from . import _pack
from ._limits import HTML_BYTES, cut_note, join_notes, keep_prefix

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b", "#bcbd22",
            "#7f7f7f", "#393b79", "#637939"]

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>Attention head view: __TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
.meta { color: #666; } .text { font-style: italic; max-width: 60em; }
#heads button { margin: 2px; border: 2px solid transparent; border-radius: 4px; padding: 3px 8px; cursor: pointer; }
#heads button.on { border-color: #222; }
.tok { cursor: default; } .tok rect { fill-opacity: 0; } .tok.hl rect { stroke: #222; stroke-width: 0.5; }
svg line { pointer-events: none; }
</style></head>
<body>
<h1>Attention head view</h1>
<p class="meta" id="meta"></p>
<p class="text" id="text"></p>
<p><label>Layer <select id="layer"></select></label> <span id="heads"></span></p>
<p class="meta">Hover a token: left = what it attends to, right = what attends to it. <span id="precision"></span></p>
<p class="meta" id="note"></p>
<svg id="view" xmlns="http://www.w3.org/2000/svg"></svg>
<script type="application/json" id="mha-data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("mha-data").textContent);
const palette = __PALETTE__;
const NS = "http://www.w3.org/2000/svg";
const tokens = data.tokens, n = tokens.length, rowH = 20, colW = 140, gap = 220;
const svg = document.getElementById("view");
const layerSel = document.getElementById("layer"), headBox = document.getElementById("heads");
let layer = data.layers[0], active = new Set([layer.heads[0].head]), focus = null;
document.getElementById("meta").textContent = "model: " + data.model +
  (data.constructed ? " (constructed demo weights, not trained)" : "") + " \u00b7 backend: " + data.backend +
  " \u00b7 " + n + " tokens" + (data.truncated ? " (" + data.truncated + " cut to fit the model)" : "");
document.getElementById("text").textContent = data.text;
document.getElementById("precision").textContent = "Precision: " + data.precision + ".";
document.getElementById("note").textContent = data.note ? "Left out: " + data.note : "";
for (const l of data.layers) {
  const o = document.createElement("option"); o.value = l.layer; o.textContent = l.layer; layerSel.appendChild(o);
}
async function inflate(b64) {  // base64 of zlib data -> Uint8Array (the browser's own inflate)
  const bin = atob(b64), raw = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) raw[i] = bin.charCodeAt(i);
  const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}
async function unpack(p) {  // codes/255; a code-0 weight shows as its row's rest spread over its code-0 cells
  const codes = await inflate(p.codes), r = await inflate(p.rest);
  const rest = new Uint16Array(r.buffer, r.byteOffset, n), w = new Float32Array(n * n);
  for (let i = 0; i < n; i++) {
    let zeros = 0;
    for (let j = 0; j < n; j++) if (codes[i * n + j] === 0) zeros++;
    const fill = zeros ? rest[i] / 65535 / zeros : 0;
    for (let j = 0; j < n; j++) { const c = codes[i * n + j]; w[i * n + j] = c ? c / 255 : fill; }
  }
  return w;
}
layerSel.addEventListener("change", () => {
  layer = data.layers.find(l => String(l.layer) === layerSel.value);
  active = new Set([layer.heads[0].head]); buildHeads(); draw();
});
function color(h) { return palette[h % palette.length]; }
function buildHeads() {
  headBox.replaceChildren();
  for (const h of layer.heads) {
    const b = document.createElement("button");
    b.dataset.head = h.head; b.style.background = color(h.head); b.style.color = "#fff";
    b.textContent = "head " + h.head + (h.label ? ": " + h.label : "") + (h.role ? " (" + h.role + ")" : "");
    b.className = active.has(h.head) ? "on" : "";
    b.addEventListener("click", () => {
      if (active.has(h.head) && active.size > 1) active.delete(h.head); else active.add(h.head);
      buildHeads(); draw();
    });
    headBox.appendChild(b);
  }
}
const lines = document.createElementNS(NS, "g"), nodes = {left: [], right: []};
function tokenNode(i, side) {
  const g = document.createElementNS(NS, "g");
  g.setAttribute("class", "tok"); g.dataset.side = side; g.dataset.i = i;
  const x = side === "left" ? 0 : colW + gap, y = i * rowH;
  const r = document.createElementNS(NS, "rect");
  r.setAttribute("x", x); r.setAttribute("y", y + 2); r.setAttribute("width", colW); r.setAttribute("height", rowH - 4);
  r.style.fill = "#ff9f1c";
  const t = document.createElementNS(NS, "text");
  t.setAttribute("x", side === "left" ? x + colW - 6 : x + 6); t.setAttribute("y", y + rowH - 6);
  t.setAttribute("text-anchor", side === "left" ? "end" : "start");
  t.textContent = tokens[i];
  g.append(r, t);
  g.addEventListener("mouseenter", () => { focus = {side, i}; draw(); });
  g.addEventListener("mouseleave", () => { focus = null; draw(); });
  return g;
}
function layout() {  // once: the token nodes stay put, so hovering never re-creates what is hovered
  svg.setAttribute("width", 2 * colW + gap); svg.setAttribute("height", n * rowH + 10);
  svg.appendChild(lines);
  for (const side of ["left", "right"]) for (let i = 0; i < n; i++) {
    const g = tokenNode(i, side); nodes[side].push(g); svg.appendChild(g);
  }
}
function draw() {
  lines.replaceChildren();
  const shade = new Array(n).fill(0);
  for (const h of layer.heads) {
    if (!active.has(h.head)) continue;
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
      const w = h.w[i * n + j];
      if (focus && ((focus.side === "left" && focus.i !== i) || (focus.side === "right" && focus.i !== j))) continue;
      if (focus) { const k = focus.side === "left" ? j : i; shade[k] = Math.max(shade[k], w); }
      if (w < 0.01) continue;
      const ln = document.createElementNS(NS, "line");
      ln.setAttribute("x1", colW); ln.setAttribute("y1", i * rowH + rowH / 2);
      ln.setAttribute("x2", colW + gap); ln.setAttribute("y2", j * rowH + rowH / 2);
      ln.setAttribute("stroke", color(h.head)); ln.setAttribute("stroke-width", 2);
      ln.setAttribute("stroke-opacity", w); lines.appendChild(ln);
    }
  }
  for (const side of ["left", "right"]) nodes[side].forEach((g, i) => {
    const other = focus && focus.side !== side;
    const w = other ? shade[i] : 0;
    g.dataset.weight = w.toFixed(4);
    g.querySelector("rect").style.fillOpacity = other ? w : (focus && focus.i === i ? 0.25 : 0);
    g.classList.toggle("hl", Boolean(other && w >= 0.1));
  });
}
(async () => {
  for (const l of data.layers) for (const h of l.heads) h.w = await unpack(h.packed);
  layout(); buildHeads(); draw();
  document.body.dataset.ready = "1";
})();
</script>
</body></html>
"""


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' characters at all (escaped as \\u003c etc.)."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page(data: dict, max_bytes: int = HTML_BYTES) -> tuple[str, str | None]:
    """(the page, a note on what was left out or None) for :func:`mha.viz.to_data`'s dict (weights as
    lists or arrays). Heads are packed (:mod:`mha.viz._pack`); those past ``max_bytes`` are left out,
    whole layers first, and the page says so."""
    pairs = [(layer["layer"], h["head"]) for layer in data["layers"] for h in layer["heads"]]
    heads = [h for layer in data["layers"] for h in layer["heads"]]
    used = [20_000 + 6 * sum(len(t) + 4 for t in data["tokens"]) + 6 * len(data.get("text", ""))]  # page, text
    packed = []
    for h in heads:
        if used[-1] > max_bytes:
            break  # what follows cannot be kept: no need to pack it
        packed.append(_pack.pack_head(h["weights"]))
        used.append(used[-1] + _pack.size(packed[-1]))
    kept = keep_prefix(pairs, lambda k: k < len(used) and used[k] <= max_bytes)
    cut = cut_note(kept, pairs, f"{max_bytes // 2**20} MiB") if len(kept) < len(pairs) else None
    note = "; ".join(x for x in (data.get("note"), join_notes([cut])) if x) or None
    layers: dict = {}
    for (layer, _), h, p in zip(kept, heads, packed):
        layers.setdefault(layer, []).append({**{k: v for k, v in h.items() if k != "weights"}, "packed": p})
    slim = {**{k: v for k, v in data.items() if k != "layers"}, "note": note, "precision": _pack.PRECISION,
            "layers": [{"layer": k, "heads": v} for k, v in layers.items()]}
    values = {"TITLE": html.escape(data.get("text", "")[:80] or data.get("model", ""), quote=True),
              "PALETTE": json.dumps(_PALETTE), "DATA": _script_json(slim)}
    # one pass over the template: text that happens to contain a placeholder is never substituted
    return re.sub(r"__(TITLE|PALETTE|DATA)__", lambda m: values[m.group(1)], _PAGE), note


def render_html(data: dict) -> str:
    """The page for :func:`mha.viz.to_data`'s dict, at most 8 MiB (see :func:`page`)."""
    return page(data)[0]
