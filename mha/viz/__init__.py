"""Showing attention: an HTML report (model view, head view, rollout, words), JSON, terminal heat maps,
PNG grids.

    report = mha.viz.report(enc)              # one self-contained page, no network; shows itself in Jupyter
    report.save("attention.html")
    data = mha.viz.to_data(enc, text=text, roles=mha.analysis.head_roles(enc.attentions, enc.tokens))
    print(mha.viz.render_term(data, color=True))
    mha.viz.save_png(data, "heads.png")       # needs the plot extra
    mha.viz.step_report(model.generate(prompt, 20, attentions=True)).save("steps.html")  # decoders

Every export is bounded (terminal width and 2,000 lines, JSON 32 MiB, HTML 8 MiB, PNG 16 megapixels):
``mha.viz.plan(fmt, tokens, pairs)`` says which heads and token window fit, and what it left out.
"""

from ._data import FORMAT, from_json, selection, to_data, to_json, top_links
from ._limits import Plan, parse_window, plan
from ._png import pyplot, save_figure, save_png
from ._report import Report, render_html, report
from ._steps import step_report
from ._term import render_term
from ._views import rollout_encoding, words_encoding

__all__ = ["FORMAT", "Plan", "Report", "from_json", "parse_window", "plan", "pyplot", "render_html", "render_term",
           "report", "rollout_encoding", "save_figure", "save_png", "selection", "step_report", "to_data", "to_json",
           "top_links", "words_encoding"]
