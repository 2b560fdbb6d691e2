"""Export an interactive HTML head view (one self-contained file, opens offline in any browser).

Run: python examples/head_view.py [TEXT]     -> writes head_view.html in the current folder
"""

import sys
from pathlib import Path

import mha.analysis as ma
import mha.models as mm
import mha.viz as mv

text = " ".join(sys.argv[1:]) or "The quick brown fox jumps over the lazy dog; the dog sleeps."
model = mm.load_model("auto")  # MiniLM when installed, else the built-in constructed model
enc = model.encode(text)
roles = ma.head_roles(enc.attentions, enc.tokens)
data = mv.to_data(enc, text=text, roles=roles, backend=model.backend, constructed=getattr(model, "constructed", False))
out = Path("head_view.html")
out.write_text(mv.render_html(data), encoding="utf-8")
print(f"{model.name}: {len(enc.tokens)} tokens, {enc.num_layers} layers x {enc.num_heads} heads -> {out.resolve()}")
