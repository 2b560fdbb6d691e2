"""Showing attention: JSON, a self-contained HTML head view, terminal heat maps, PNG grids.

    data = mha.viz.to_data(enc, text=text, roles=mha.analysis.head_roles(enc.attentions, enc.tokens))
    html = mha.viz.render_html(data)          # one file, no network; tokens escaped
    print(mha.viz.render_term(data, color=True))
    mha.viz.save_png(data, "heads.png")       # needs the plot extra

Every export is bounded (terminal width and 2,000 lines, JSON 32 MiB, HTML 8 MiB, PNG 16 megapixels):
``mha.viz.plan(fmt, tokens, pairs)`` says which heads and token window fit, and what it left out.
"""

from ._data import FORMAT, from_json, selection, to_data, to_json, top_links
from ._html import render_html
from ._limits import Plan, plan
from ._png import save_png
from ._term import render_term

__all__ = ["FORMAT", "Plan", "from_json", "plan", "render_html", "render_term", "save_png", "selection", "to_data",
           "to_json", "top_links"]
