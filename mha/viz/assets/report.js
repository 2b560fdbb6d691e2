"use strict";
// The attention report (mha/viz/_report.py writes the data; this draws it). No network, no libraries:
// canvases for heat maps, one SVG for the head view's lines, text only through textContent.
const D = JSON.parse(document.getElementById("mha-data").textContent);
const $ = id => document.getElementById(id);
const NS = "http://www.w3.org/2000/svg";
// the 10 levels of the terminal and PNG scale (viridis at the middle of each bin, as in the PNG)
const COLORS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1e9d89", "#35b779", "#6ccd5a", "#b2dd2d", "#fde725"];
const RGB = COLORS.map(c => [1, 3, 5].map(k => parseInt(c.slice(k, k + 2), 16)));
const ROLE_COLORS = {previous: "#1f77b4", next: "#ff7f0e", self: "#2ca02c", first: "#d62728", last: "#9467bd",
  punctuation: "#8c564b", broad: "#999999", content: "#e377c2", same_word: "#bcbd22", local: "#17becf"};
const S = {view: D.view, words: D.start_words, start: 0, size: 48, head: 0, rollLayer: D.num_layers - 1, role: ""};
const cache = new Map();

function level(w) { let k = 0; while (k < D.levels.length && w >= D.levels[k]) k++; return k; }
function fmt(w) { return w >= 0.095 ? w.toFixed(2) : w.toPrecision(2); }

async function inflate(b64) {  // base64 of zlib data -> Uint8Array (the browser's own inflate)
  const bin = atob(b64), raw = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) raw[i] = bin.charCodeAt(i);
  const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function unpack(p, n) {  // codes/255; a code-0 weight shows as its row's rest spread over its code-0 cells
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

function merge(W, n, spans) {  // to a word = sum over its pieces, from a word = mean over its pieces
  const m = spans.length, cols = new Float32Array(n * m), out = new Float32Array(m * m);
  for (let i = 0; i < n; i++) for (let b = 0; b < m; b++) {
    let s = 0; for (let j = spans[b][0]; j < spans[b][1]; j++) s += W[i * n + j]; cols[i * m + b] = s;
  }
  for (let a = 0; a < m; a++) {
    const [s0, s1] = spans[a];
    for (let b = 0; b < m; b++) { let s = 0; for (let i = s0; i < s1; i++) s += cols[i * m + b]; out[a * m + b] = s / (s1 - s0); }
  }
  return out;
}

function unit() {  // the labels of the current unit (tokens or words) and their count
  const labels = S.words ? D.words.text : D.tokens;
  return {labels, n: labels.length, offset: S.words ? 0 : (D.token_offset || 0)};
}

async function matrix(key, packed) {  // a packed (n, n) matrix in the current unit, cached
  const id = key + (S.words ? "/w" : "/t");
  if (!cache.has(id)) {
    const n = D.tokens.length;
    const tokenLevel = cache.get(key + "/t") || await unpack(packed, n);
    cache.set(key + "/t", tokenLevel);
    if (S.words) cache.set(id, merge(tokenLevel, n, D.words.spans));
  }
  return cache.get(id);
}

function paint(canvas, W, n, r0, r1, px) {  // rows and columns r0..r1-1 of W (n x n), px pixels a cell
  const m = r1 - r0;
  canvas.width = m * px; canvas.height = m * px;
  cells(canvas.getContext("2d"), W, n, r0, r1, px, 0, 0);
  canvas.geom = {ml: 0, mt: 0, px, a: r0, b: r1};
}

function cells(ctx, W, n, r0, r1, px, x0, y0) {  // the cells of rows/columns r0..r1-1 at (x0, y0)
  const m = r1 - r0, img = ctx.createImageData(m, m);
  for (let i = 0; i < m; i++) for (let j = 0; j < m; j++) {
    const c = RGB[level(W[(r0 + i) * n + r0 + j])], o = 4 * (i * m + j);
    img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
  }
  const tmp = document.createElement("canvas"); tmp.width = m; tmp.height = m; tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false; ctx.drawImage(tmp, x0, y0, m * px, m * px);
}

function short(label, k) { const t = label.length > 12 ? label.slice(0, 11) + "\u2026" : label; return `${k} ${t}`; }

function heat(canvas, W, n, a, b, px, u) {  // the window's cells with token labels on both axes (every k-th when many)
  const m = b - a, font = "11px system-ui, sans-serif", step = Math.ceil(13 / px);
  const probe = canvas.getContext("2d"); probe.font = font;
  const shown = []; for (let i = a; i < b; i += step) shown.push(i);
  const lw = Math.ceil(Math.max(...shown.map(i => probe.measureText(short(u.labels[i], u.offset + i)).width))) + 8;
  canvas.width = lw + m * px + 4; canvas.height = lw + m * px + 4;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  cells(ctx, W, n, a, b, px, lw, lw);
  ctx.font = font; ctx.fillStyle = "#333"; ctx.textBaseline = "middle";
  for (const i of shown) {  // rows (queries) at the left, right-aligned; columns (keys) on top, written upwards
    const c = (i - a) * px + px / 2, text = short(u.labels[i], u.offset + i);
    ctx.textAlign = "right"; ctx.fillText(text, lw - 4, lw + c);
    ctx.save(); ctx.translate(lw + c, lw - 4); ctx.rotate(-Math.PI / 2); ctx.textAlign = "left"; ctx.fillText(text, 0, 0); ctx.restore();
  }
  canvas.geom = {ml: lw, mt: lw, px, a, b};
  canvas.dataset.labels = shown.length;
}

function overview(canvas, W, n) {  // the whole matrix, at most 512 px, with the window drawn on it
  const px = Math.max(1, Math.floor(256 / n));
  paint(canvas, W, n, 0, n, px);
  const ctx = canvas.getContext("2d"), [a, b] = win();
  ctx.strokeStyle = "#ff2d55"; ctx.lineWidth = 2; ctx.strokeRect(a * px, a * px, (b - a) * px, (b - a) * px);
  canvas.style.width = Math.min(512, Math.max(256, n * px)) + "px";
  canvas.onclick = e => {
    const r = canvas.getBoundingClientRect();
    moveWindow(Math.floor((e.clientY - r.top) / r.height * n) - Math.floor(S.size / 2));
  };
}

function win() {  // [start, stop) of the token (or word) window
  const n = unit().n, size = Math.min(S.size, n), a = Math.max(0, Math.min(S.start, n - size));
  return [a, a + size];
}

function cellAt(canvas, e) {  // [row, column] (in the unit's numbering) under the pointer, or null
  const g = canvas.geom, r = canvas.getBoundingClientRect(), k = canvas.width / r.width;
  const i = g.a + Math.floor(((e.clientY - r.top) * k - g.mt) / g.px), j = g.a + Math.floor(((e.clientX - r.left) * k - g.ml) / g.px);
  return i < g.a || j < g.a || i >= g.b || j >= g.b ? null : [i, j];
}

function hoverMap(canvas, mats, names, onRow) {  // tooltip: the weight(s) of the cell under the pointer
  const tip = $("tip");
  canvas.onmousemove = e => {
    const at = cellAt(canvas, e), u = unit();
    if (!at) { tip.hidden = true; return; }
    const [i, j] = at;
    tip.textContent = `${u.labels[i]} (${u.offset + i}) \u2192 ${u.labels[j]} (${u.offset + j})\n` +
      mats.map((W, k) => `${names[k]}: ${fmt(W[i * u.n + j])}`).join("\n");
    tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; tip.hidden = false;
    if (onRow) onRow(i);
  };
  canvas.onmouseleave = () => { tip.hidden = true; };
}

function cellPx(m) { return Math.max(4, Math.min(24, Math.floor(420 / m))); }

function legend() {
  const box = $("legend"); box.replaceChildren(document.createTextNode("weight from: "));
  ["0", ...D.levels.map(String)].forEach((b, k) => {
    const s = document.createElement("span"); s.style.background = COLORS[k]; s.title = "from " + b;
    box.append(s, document.createTextNode(" " + b.replace(/^0\./, ".") + " "));
  });
}

function drawModel() {
  const grid = $("grid"), heads = D.heads, layers = [...new Set(heads.map(h => h.layer))];
  const cols = [...new Set(heads.map(h => h.head))].sort((a, b) => a - b);
  grid.replaceChildren(); grid.style.gridTemplateColumns = `3em repeat(${cols.length}, 76px)`;
  grid.append(document.createElement("span"));
  for (const c of cols) {
    const s = document.createElement("span"); s.className = "axis"; s.textContent = "head " + c; grid.append(s);
  }
  const jobs = [];
  for (const layer of layers) {
    const s = document.createElement("span"); s.className = "axis"; s.textContent = "L" + layer; grid.append(s);
    for (const c of cols) {
      const idx = heads.findIndex(h => h.layer === layer && h.head === c), cell = document.createElement("div");
      grid.append(cell);
      if (idx < 0) continue;
      const h = heads[idx], canvas = document.createElement("canvas"), cap = document.createElement("div");
      cell.className = "cell thumb"; cell.dataset.layer = layer; cell.dataset.head = c; cell.dataset.role = h.role || "";
      canvas.style.borderColor = ROLE_COLORS[h.role] || "#ccc";
      cap.textContent = h.role ? `${h.role} ${h.score.toFixed(2)}` : (h.label || "");
      cell.title = `layer ${layer}, head ${c}` + (h.label ? `: ${h.label}` : "") +
        (h.role ? `\n${h.role} ${h.score.toFixed(2)}` : "");
      cell.append(canvas, cap);
      cell.classList.toggle("off", Boolean(S.role) && h.role !== S.role);
      cell.addEventListener("click", () => { S.head = idx; show("head"); });
      jobs.push(thumb(canvas, h));
    }
  }
  return Promise.all(jobs);
}

async function thumb(canvas, h) {
  const side = S.words ? h.wside : h.side, lv = await inflate(S.words ? h.wthumb : h.thumb);
  canvas.width = side; canvas.height = side;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(side, side);
  for (let k = 0; k < side * side; k++) { const c = RGB[lv[k]]; img.data.set([c[0], c[1], c[2], 255], 4 * k); }
  ctx.putImageData(img, 0, 0);
}

function drawLines(W, labels, n, a, b, offset) {  // bertviz-style: queries left, keys right, for the window
  const svg = $("lines"), rowH = 18, colW = 130, gap = 160, m = b - a;
  svg.replaceChildren(); svg.setAttribute("width", 2 * colW + gap); svg.setAttribute("height", m * rowH + 6);
  const lines = document.createElementNS(NS, "g"), nodes = {left: [], right: []};
  svg.append(lines);
  let focus = null;
  const render = () => {
    lines.replaceChildren();
    const shade = new Float32Array(m);
    for (let i = 0; i < m; i++) for (let j = 0; j < m; j++) {
      if (focus && ((focus.side === "left" && focus.i !== i) || (focus.side === "right" && focus.i !== j))) continue;
      const w = W[(a + i) * n + a + j];
      if (focus) { const k = focus.side === "left" ? j : i; shade[k] = Math.max(shade[k], w); }
      if (w < 0.01) continue;
      const ln = document.createElementNS(NS, "line");
      ln.setAttribute("x1", colW); ln.setAttribute("y1", i * rowH + rowH / 2);
      ln.setAttribute("x2", colW + gap); ln.setAttribute("y2", j * rowH + rowH / 2);
      ln.setAttribute("stroke", "#1f77b4"); ln.setAttribute("stroke-width", 2); ln.setAttribute("stroke-opacity", w);
      lines.append(ln);
    }
    for (const side of ["left", "right"]) nodes[side].forEach((g, i) => {
      const other = focus && focus.side !== side, w = other ? shade[i] : 0;
      g.dataset.weight = w.toFixed(4);
      g.querySelector("rect").style.fillOpacity = other ? w : (focus && focus.i === i ? 0.25 : 0);
      g.classList.toggle("hl", Boolean(other && w >= 0.1));
    });
    info(W, labels, n, offset, focus ? {side: focus.side, i: a + focus.i} : null, $("info"));
  };
  for (const side of ["left", "right"]) for (let i = 0; i < m; i++) {
    const g = document.createElementNS(NS, "g"), x = side === "left" ? 0 : colW + gap;
    g.setAttribute("class", "tok"); g.dataset.side = side; g.dataset.i = a + i;
    const r = document.createElementNS(NS, "rect"), t = document.createElementNS(NS, "text");
    r.setAttribute("x", x); r.setAttribute("y", i * rowH + 2); r.setAttribute("width", colW); r.setAttribute("height", rowH - 4);
    t.setAttribute("x", side === "left" ? x + colW - 6 : x + 6); t.setAttribute("y", i * rowH + rowH - 5);
    t.setAttribute("text-anchor", side === "left" ? "end" : "start"); t.textContent = labels[a + i];
    g.append(r, t);
    g.addEventListener("mouseenter", () => { focus = {side, i}; render(); });
    g.addEventListener("mouseleave", () => { focus = null; render(); });
    nodes[side].push(g); svg.append(g);
  }
  render();
}

function strongest(W, labels, n, offset, i, side) {  // the 6 strongest links of token i, over the whole text
  const vals = [];
  for (let k = 0; k < n; k++) vals.push([k, side === "left" ? W[i * n + k] : W[k * n + i]]);
  vals.sort((x, y) => y[1] - x[1]);
  return vals.slice(0, 6).map(([k, w]) => `${labels[k]} (${offset + k}) ${fmt(w)}`).join(", ");
}

function info(W, labels, n, offset, focus, box) {
  if (!focus) { box.textContent = "Hover a token or a cell: its strongest links over the whole text show here."; return; }
  const what = focus.side === "left" ? "attends to" : "is attended by";
  box.textContent = `${labels[focus.i]} (${offset + focus.i}) ${what}: ` + strongest(W, labels, n, offset, focus.i, focus.side);
}

async function drawHead() {
  const h = D.heads[S.head], u = unit(), [a, b] = win();
  $("head-layer").value = h.layer; fillHeads(h.layer); $("head-head").value = S.head;
  $("head-title").textContent = `layer ${h.layer}, head ${h.head}` + (h.label ? ` (${h.label})` : "") +
    (h.role ? `: ${h.role} ${h.score.toFixed(2)}` : "");
  const W = await matrix("h" + S.head, h.packed);
  $("top-links").hidden = !h.top;
  if (h.top) {
    $("top-links").textContent = `Strongest links of this head (query \u2192 key): ` + h.top.map(([i, j, w]) =>
      `${D.tokens[i - (D.token_offset || 0)]} (${i}) \u2192 ${D.tokens[j - (D.token_offset || 0)]} (${j}) ${fmt(w)}`).join(", ");
  }
  heat($("head-map"), W, u.n, a, b, cellPx(b - a), u);
  hoverMap($("head-map"), [W], ["weight"], i => info(W, u.labels, u.n, u.offset, {side: "left", i}, $("info")));
  drawLines(W, u.labels, u.n, a, b, u.offset);
  overview($("head-overview"), W, u.n);
}

async function drawRollout() {
  const u = unit(), [a, b] = win(), l = S.rollLayer, m = D.maps[l];
  const raw = await matrix("m" + l, m.mean), roll = await matrix("r" + l, m.rollout);
  $("raw-caption").textContent = `Raw attention of layer ${l}, mean over its heads`;
  $("roll-caption").textContent = `Rollout through layers 0-${l}: how much of each input token reaches each position`;
  heat($("raw-map"), raw, u.n, a, b, cellPx(b - a), u); heat($("roll-map"), roll, u.n, a, b, cellPx(b - a), u);
  const row = i => {
    $("roll-info").textContent = `${u.labels[i]} (${u.offset + i}) after layer ${l} draws on: ` +
      strongest(roll, u.labels, u.n, u.offset, i, "left") + `; its raw attention in layer ${l}: ` +
      strongest(raw, u.labels, u.n, u.offset, i, "left");
  };
  hoverMap($("raw-map"), [raw, roll], ["raw", "rollout"], row); hoverMap($("roll-map"), [raw, roll], ["raw", "rollout"], row);
  overview($("roll-overview"), roll, u.n);
  $("roll-info").textContent = "Hover a cell: where that position's information comes from, after rollout and in raw attention.";
}

function fillHeads(layer) {
  const sel = $("head-head"); sel.replaceChildren();
  D.heads.forEach((h, idx) => {
    if (h.layer === layer) sel.append(new Option("" + h.head + (h.role ? " " + h.role : ""), idx));
  });
}

function moveWindow(start) { S.start = Math.max(0, start); syncRange(); redraw(); }

function syncRange() {
  const n = unit().n, [a, b] = win();
  S.start = a;
  $("win-start").max = n - 1; $("win-start").value = a; $("win-slider").max = Math.max(0, n - (b - a)); $("win-slider").value = a;
  $("win-info").textContent = `${S.words ? "words" : "tokens"} ${a + unit().offset}-${b - 1 + unit().offset} of ${n}`;
}

let drawing = Promise.resolve();
function redraw() {
  drawing = drawing.then(() => S.view === "head" ? drawHead() : S.view === "rollout" ? drawRollout() : drawModel());
  return drawing;
}

function show(view) {
  if (view === "rollout" && !D.maps.length) view = "model";
  S.view = view; document.body.dataset.view = view;
  for (const v of ["model", "head", "rollout"]) $(v).hidden = v !== view;
  document.querySelectorAll("#tabs button").forEach(b => b.classList.toggle("on", b.dataset.view === view));
  return redraw();
}

function setup() {
  const meta = `model: ${D.model}` + (D.constructed ? " (constructed demo weights, not trained)" : "") +
    (D.backend ? ` \u00b7 backend: ${D.backend}` : "") + ` \u00b7 ${D.num_tokens || D.tokens.length} tokens` +
    (D.truncated ? ` (${D.truncated} more cut to fit the model)` : "") + ` \u00b7 ${D.heads.length} heads shown`;
  $("meta").textContent = meta; $("text").textContent = D.text;
  $("precision").textContent = "Precision: " + D.precision + ". Colours: the 10 levels of the terminal and PNG views.";
  if (D.note) { $("note").hidden = false; $("note").textContent = "Left out: " + D.note; }
  $("rule-link").title = D.rule || "";
  $("residual").textContent = "residual share " + D.residual;
  legend();
  for (const s of [16, 32, 48, 64, 96, 128]) $("win-size").append(new Option(s, s));
  S.size = Math.min(48, D.tokens.length); $("win-size").value = 48;
  $("words").checked = S.words;
  $("words").addEventListener("change", () => {  // the window stays on the same part of the text
    const spans = D.words.spans, toWords = $("words").checked, was = S.start;
    S.start = toWords ? Math.max(0, spans.findIndex(([s0, s1]) => s1 > S.start)) :
      S.back && S.back[0] === S.start ? S.back[1] : (spans[S.start] || [0])[0];  // back where it was, if not moved
    S.back = toWords ? [S.start, was] : null;
    S.words = toWords; syncRange(); redraw();
  });
  const counts = {};
  D.heads.forEach(h => { if (h.role) counts[h.role] = (counts[h.role] || 0) + 1; });
  Object.keys(counts).forEach(r => $("role-filter").append(new Option(`${r} (${counts[r]})`, r)));
  $("role-counts").textContent = "roles of the " + D.heads.length + " heads: " +
    Object.entries(counts).sort((x, y) => y[1] - x[1]).map(([r, c]) => `${r} ${c}`).join(", ");
  $("role-filter").addEventListener("change", () => { S.role = $("role-filter").value; redraw(); });
  $("win-size").addEventListener("change", () => { S.size = +$("win-size").value; syncRange(); redraw(); });
  $("win-start").addEventListener("change", () => moveWindow(+$("win-start").value));
  $("win-slider").addEventListener("input", () => moveWindow(+$("win-slider").value));
  document.querySelectorAll("#tabs button").forEach(b => b.addEventListener("click", () => show(b.dataset.view)));
  if (!D.maps.length) document.querySelector('#tabs button[data-view="rollout"]').disabled = true;
  const layers = [...new Set(D.heads.map(h => h.layer))];
  for (const l of layers) $("head-layer").append(new Option(l, l));
  $("head-layer").addEventListener("change", () => {
    S.head = D.heads.findIndex(h => h.layer === +$("head-layer").value); redraw();
  });
  $("head-head").addEventListener("change", () => { S.head = +$("head-head").value; redraw(); });
  $("head-prev").addEventListener("click", () => { S.head = (S.head + D.heads.length - 1) % D.heads.length; redraw(); });
  $("head-next").addEventListener("click", () => { S.head = (S.head + 1) % D.heads.length; redraw(); });
  D.maps.forEach(m => $("roll-layer").append(new Option(m.layer, m.layer)));
  $("roll-layer").value = S.rollLayer;
  $("roll-layer").addEventListener("change", () => { S.rollLayer = +$("roll-layer").value; redraw(); });
  document.querySelectorAll("button.save").forEach(b => b.addEventListener("click", () => save($(b.dataset.canvas))));
  syncRange();
}

function save(canvas) {  // the heat map as a PNG file (bertviz has had "save as image" open since 2019)
  canvas.toBlob(blob => {
    const a = document.createElement("a"); a.href = URL.createObjectURL(blob);
    const h = D.heads[S.head];
    a.download = (S.view === "head" ? `head-L${h.layer}-H${h.head}` : `rollout-L${S.rollLayer}`) + ".png";
    a.click(); setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  });
}

setup();
show(S.view).then(() => { document.body.dataset.ready = "1"; });
