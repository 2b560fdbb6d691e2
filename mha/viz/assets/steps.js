"use strict";
// The step view (mha/viz/_steps.py): the data is JSON in #data; every string goes in with textContent.
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const R = D.rows, P = D.prompt_length, W = {};  // W["layer,head"]: Float32Array(R * R), row t = query t

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
    for (let j = 0; j <= i; j++) if (codes[i * n + j] === 0) zeros++;
    const fill = zeros ? rest[i] / 65535 / zeros : 0;  // causal rows: only keys 0..i can hold weight
    for (let j = 0; j < n; j++) { const c = codes[i * n + j]; w[i * n + j] = c ? c / 255 : (j <= i ? fill : 0); }
  }
  return w;
}

const layers = [...new Set(D.heads.map((h) => h.layer))];
const state = { t: Math.max(0, Math.min(R - 1, P - 1)), layer: layers[0], head: -1 };

const ROW = 12;  // pixels per head in the grid
function cellWidth() { return Math.max(1, Math.min(20, Math.floor(960 / R))); }  // pixels per position

function color(w) { return `rgba(255, 159, 28, ${Math.min(1, Math.max(0, w)).toFixed(3)})`; }

function headsOf(layer) { return D.heads.filter((h) => h.layer === layer).map((h) => h.head); }

function chosen() {  // the head shown on the tokens: the chosen one, or the layer's strongest at this step
  if (state.head >= 0) return state.head;
  let best = headsOf(state.layer)[0], top = -1;
  for (const h of headsOf(state.layer)) {
    const w = W[`${state.layer},${h}`];
    for (let j = 0; j <= state.t; j++) if (w[state.t * R + j] > top) { top = w[state.t * R + j]; best = h; }
  }
  return best;
}

function label(i) { return JSON.stringify(D.tokens[i]); }

function drawTokens(head) {
  const w = W[`${state.layer},${head}`], box = $("tokens");
  box.querySelectorAll(".t").forEach((el) => {
    const i = +el.dataset.i, v = i <= state.t ? w[state.t * R + i] : 0;
    el.style.background = color(v);
    el.dataset.weight = v.toFixed(4);
    el.classList.toggle("future", i > state.t + 1);
    el.classList.toggle("query", i === state.t);
    el.classList.toggle("next", i === state.t + 1);
    el.title = i <= state.t ? `position ${i}: ${v.toFixed(3)}` : `position ${i}`;
  });
  const row = Array.from({ length: state.t + 1 }, (_, j) => [w[state.t * R + j], j]).sort((a, b) => b[0] - a[0]);
  const top = row.slice(0, 5).map(([v, j]) => `${label(j)} (${j}) ${v.toFixed(2)}`).join(", ");
  const step = state.t - P + 1;
  let sink = "";
  if (D.sink_mass && step >= 0 && step < D.sink_mass.length) sink = `; sink ${D.sink_mass[step][state.layer][head].toFixed(3)}`;
  const r = roleOf(state.layer, head);
  const role = r ? `; role ${r.role} ${r.score.toFixed(2)} (chance ${r.chance.toFixed(2)})` : "";
  $("info").textContent = `layer ${state.layer}, head ${head}${state.head < 0 ? " (strongest)" : ""}: ` +
    `${label(state.t)} (${state.t}) attends to ${top}${sink}${role}`;
  drawSinks(step);
}

function roleOf(layer, head) { return D.roles ? D.roles.heads.find((r) => r.layer === layer && r.head === head) : null; }

function drawSinks(step) {  // the learned sinks' share of this step's row, every head of the chosen layer
  const el = $("sinks");
  el.hidden = !D.sink_mass;
  if (!D.sink_mass) return;
  const s = Math.max(0, step), m = D.sink_mass[Math.min(s, D.sink_mass.length - 1)][state.layer];
  el.textContent = `sink mass at ${step >= 0 ? "step " + step : "the prompt's last row"}, layer ${state.layer}: ` +
    m.map((v, h) => `head ${h} ${v.toFixed(3)}`).join(", ");
}

function drawRoles(head) {
  if (!D.roles) return;
  $("roles-body").querySelectorAll("tr").forEach((tr) => {
    tr.classList.toggle("chosen", +tr.dataset.layer === state.layer && +tr.dataset.head === head);
  });
}

function drawGrid(head) {
  const cell = cellWidth();
  $("grid").querySelectorAll("canvas").forEach((cv) => {
    const layer = +cv.dataset.layer, hs = headsOf(layer), ctx = cv.getContext("2d");
    ctx.clearRect(0, 0, cv.width, cv.height);
    hs.forEach((h, r) => {
      const w = W[`${layer},${h}`];
      for (let j = 0; j <= state.t; j++) {
        ctx.fillStyle = color(w[state.t * R + j]);
        ctx.fillRect(j * cell, r * ROW, cell, ROW);
      }
      if (layer === state.layer && h === head) {
        ctx.strokeStyle = "#222"; ctx.strokeRect(0.5, r * ROW + 0.5, (state.t + 1) * cell - 1, ROW - 1);
      }
    });
  });
}

function draw() {
  const step = state.t - P + 1;
  $("step").value = state.t;
  $("step-label").textContent = (step >= 0 ? `step ${step}` : "prompt") +
    `: ${label(state.t)} (${state.t}) -> ${state.t + 1 < D.tokens.length ? label(state.t + 1) : "?"}`;
  const head = chosen();
  drawTokens(head);
  drawGrid(head);
  drawRoles(head);
}

function buildRoles(ls, fillHeads) {
  if (!D.roles) return;
  $("roles").hidden = false;
  $("roles-how").textContent = `${D.roles.rule} Induction and duplicate on ${D.roles.sequences} repeated random ` +
    `sequences; the other roles on ${D.roles.texts ? D.roles.texts + " texts" : "the same sequences"}. Click a row to ` +
    "choose that head.";
  for (const r of D.roles.heads) {
    const tr = document.createElement("tr");
    tr.dataset.layer = r.layer;
    tr.dataset.head = r.head;
    if (r.specialised) tr.className = "special";
    for (const v of [r.layer, r.head, r.kv_head, r.role, r.score.toFixed(2), r.chance.toFixed(2),
      `[${r.ci[0].toFixed(2)}, ${r.ci[1].toFixed(2)}]`, r.specialised ? "yes" : "no"]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.appendChild(td);
    }
    tr.onclick = () => {
      if (!W[`${r.layer},${r.head}`]) return;  // a head left out of the page (size bound)
      state.layer = r.layer; state.head = r.head; ls.value = r.layer; fillHeads(); draw();
    };
    $("roles-body").appendChild(tr);
  }
}

function build() {
  $("meta").textContent = `${D.model} (${D.backend}): ${D.num_layers} layers x ${D.num_heads} heads; ` +
    `${P} prompt tokens, ${D.tokens.length - P} generated` + (D.new_text ? `: ${JSON.stringify(D.new_text)}` : "");
  $("precision").textContent = "Weights: " + D.precision + ".";
  if (D.note) { $("note").hidden = false; $("note").textContent = D.note; }
  const box = $("tokens");
  D.tokens.forEach((tok, i) => {
    const el = document.createElement("span");
    el.className = "t" + (i >= P ? " gen" : "") + (D.valid && !D.valid[i] ? " pad" : "");
    el.dataset.i = i;
    el.textContent = tok;
    box.appendChild(el);
  });
  const sl = $("step");
  sl.max = R - 1;
  sl.addEventListener("input", () => { state.t = +sl.value; draw(); });
  $("prev").onclick = () => { state.t = Math.max(0, state.t - 1); draw(); };
  $("next").onclick = () => { state.t = Math.min(R - 1, state.t + 1); draw(); };
  document.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") $("prev").click();
    if (e.key === "ArrowRight") $("next").click();
  });
  const ls = $("layer"), hs = $("head");
  layers.forEach((l) => ls.add(new Option(String(l), l)));
  const fillHeads = () => {
    hs.innerHTML = "";
    hs.add(new Option("strongest", -1));
    headsOf(state.layer).forEach((h) => hs.add(new Option(String(h), h)));
    hs.value = state.head;
  };
  fillHeads();
  ls.onchange = () => { state.layer = +ls.value; state.head = -1; fillHeads(); draw(); };
  hs.onchange = () => { state.head = +hs.value; draw(); };
  const cell = cellWidth();
  layers.forEach((l) => {
    const row = document.createElement("div"), name = document.createElement("span"), cv = document.createElement("canvas");
    row.className = "layer";
    name.textContent = `L${l}`;
    cv.dataset.layer = l;
    cv.width = R * cell;
    cv.height = headsOf(l).length * ROW;
    cv.addEventListener("click", (e) => {
      const r = Math.floor((e.offsetY / cv.clientHeight) * headsOf(l).length);
      state.layer = l; state.head = headsOf(l)[Math.min(r, headsOf(l).length - 1)];
      ls.value = l; fillHeads(); draw();
    });
    row.append(name, cv);
    $("grid").appendChild(row);
  });
  $("legend").append("weight 0 ");
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    const s = document.createElement("span");
    s.style.background = color(v);
    s.title = v.toFixed(2);
    $("legend").appendChild(s);
  }
  $("legend").append(" 1");
  buildRoles(ls, fillHeads);
}

(async () => {
  for (const h of D.heads) W[`${h.layer},${h.head}`] = await unpack(h.packed, R);
  build();
  draw();
  document.body.dataset.ready = "1";
})();
