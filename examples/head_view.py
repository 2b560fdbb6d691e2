"""Export the interactive attention report (one self-contained file, opens offline in any browser):
model view (every head as a thumbnail with its role), head view, rollout, words or subwords.

Run: python examples/head_view.py [TEXT]     -> writes attention_report.html in the current folder
In Jupyter, an encoding shows the same report by itself: just put `enc` last in a cell.
"""

import sys
from pathlib import Path

import mha.models as mm
import mha.viz as mv

text = " ".join(sys.argv[1:]) or "The quick brown fox jumps over the lazy dog; the dog sleeps."
model = mm.load_model("auto")  # MiniLM when installed, else the built-in constructed model
enc = model.encode(text)
report = mv.report(enc, backend=model.backend)  # roles, thumbnails, packed weights, rollout
assert report.note is None and report.size <= 8 * 2**20  # every head fits within the page's 8 MiB bound
out = report.save(Path("attention_report.html"))
print(f"{model.name}: {len(enc.tokens)} tokens, {enc.num_layers} layers x {enc.num_heads} heads -> {out} "
      f"({report.size / 1e6:.2f} MB; open it in a browser)")
