// The weights' codec, shared by the report and the step view (put in front of each page's script):
// a head's (n, n) weights travel as zlib'd codes (weight * 255, rounded) plus, per row, the weight its
// code-0 cells hold together (rest / 65535), spread evenly over them. With `causal`, row i's keys
// beyond i are exactly 0 and take none of the rest.

async function inflate(b64) {  // base64 of zlib data -> Uint8Array (the browser's own inflate)
  const bin = atob(b64), raw = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) raw[i] = bin.charCodeAt(i);
  const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function unpack(p, n, causal = false) {  // -> Float32Array(n * n), row i = query i
  const codes = await inflate(p.codes), r = await inflate(p.rest);
  const rest = new Uint16Array(r.buffer, r.byteOffset, n), w = new Float32Array(n * n);
  for (let i = 0; i < n; i++) {
    const last = causal ? i : n - 1;  // the last key that can hold weight
    let zeros = 0;
    for (let j = 0; j <= last; j++) if (codes[i * n + j] === 0) zeros++;
    const fill = zeros ? rest[i] / 65535 / zeros : 0;
    for (let j = 0; j < n; j++) { const c = codes[i * n + j]; w[i * n + j] = c ? c / 255 : (j <= last ? fill : 0); }
  }
  return w;
}
