"""The HTML report's data, built in Python (the browser side is tests/test_browser.py): what the page
holds decodes to the weights within the stated precision, thumbnails are max-pooled levels, rollout is
mha.analysis.rollout, it shows itself in Jupyter, and `mha demo --view rollout / --words` work in
every format."""

from __future__ import annotations

import base64
import html
import json
import re
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

import mha.analysis as ma
import mha.models as mm
import mha.viz as mv
from mha.viz import _pack
from mha.viz._report import THUMB, build, thumbnail
from mha_cli.main import cli

TEXT = "The cat sat on the mat."


def page_data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="mha-data">(.*?)</script>', page, re.S).group(1))


def test_512_token_report_holds_every_head_within_precision(minilm_512, minilm_512_report):
    _, enc, _ = minilm_512
    report = minilm_512_report
    assert report.size <= 8 * 2**20 and report.note is None
    data = page_data(report.html)
    assert len(data["heads"]) == 72 and len(data["maps"]) == 6 and data["precision"] == _pack.PRECISION
    R = ma.rollout(enc.attentions)
    for k in (0, 2, 40, 71):  # decoded as the page decodes it
        h = data["heads"][k]
        W = enc.attentions[h["layer"], h["head"]].astype(np.float64)
        shown = _pack.unpack_head(h["packed"], 512)
        assert np.abs(shown - W).max() <= 1 / 255  # each weight within 0.004
        np.testing.assert_allclose(shown.sum(-1), W.sum(-1), atol=4e-3)  # rows keep their sums
        assert h["side"] == THUMB and h["wside"] <= THUMB
    roll = _pack.unpack_head(data["maps"][5]["rollout"], 512)
    assert np.abs(roll - R[5]).max() <= 1 / 255


def test_thumbnail_is_max_pooled_levels():
    W = np.zeros((130, 130), np.float32)
    W[np.arange(1, 130), np.arange(129)] = 1.0  # a previous-token diagonal
    W[5, 77] = 0.015
    b64, side = thumbnail(W)
    lv = np.frombuffer(zlib.decompress(base64.b64decode(b64)), np.uint8).reshape(side, side)
    assert side == 44  # 3 tokens a cell
    assert lv[1, 25] == 1 and (lv[np.arange(43), np.arange(43)] == 9).all() and lv[43, 42] == 9  # diagonal kept
    assert lv.max() == 9 and (lv == 0).sum() > side * side - 3 * side


def test_notebook_display_is_a_sandboxed_frame():
    enc = mm.load_model("builtin").encode(TEXT)
    shown = enc._repr_html_()
    assert shown.startswith('<iframe srcdoc="') and 'sandbox="allow-scripts allow-downloads"' in shown
    doc = html.unescape(shown.split('srcdoc="', 1)[1].split('" sandbox=', 1)[0])
    assert doc.startswith("<!DOCTYPE html>") and '<body class="embedded">' in doc
    assert page_data(doc)["text"] == TEXT and '"' not in shown.split('srcdoc="', 1)[1].split('" sandbox=')[0]


def test_render_html_of_some_heads_has_no_rollout_and_of_all_heads_has_it():
    enc = mm.load_model("builtin").encode(TEXT)
    some = page_data(mv.render_html(mv.to_data(enc, heads=[0, 3])))
    assert [h["head"] for h in some["heads"]] == [0, 3] and some["maps"] == []
    every = page_data(mv.render_html(mv.to_data(enc), view="rollout", words=True))
    assert len(every["maps"]) == 1 and every["view"] == "rollout" and every["start_words"] is True
    window = page_data(mv.render_html(mv.to_data(enc, tokens=(2, 6))))  # a window's rollout is not the text's
    assert window["maps"] == [] and len(window["heads"]) == 8 and window["tokens"] == enc.tokens[2:6]
    with pytest.raises(ValueError, match="view must be one of model, head, rollout, got 'heads'"):
        build(mv.to_data(enc), view="heads")


def test_report_keeps_at_least_one_head():
    enc = mm.load_model("builtin").encode(TEXT)
    report = build(mv.to_data(enc, arrays=True), max_bytes=1000)
    assert len(page_data(report.html)["heads"]) == 1 and "(1 of 8 heads)" in report.note


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_demo_rollout_in_the_terminal_png_and_json(tmp_path):
    res = run("demo", "--model", "builtin", "--view", "rollout", "--no-color", TEXT)
    assert res.exit_code == 0, res.output
    assert "rollout L0-0" in res.stdout and "[" not in res.stdout.splitlines()[0]  # no role on a rollout panel
    data = json.loads(run("demo", "--model", "builtin", "--view", "rollout", "--format", "json", TEXT).stdout)
    enc = mm.load_model("builtin").encode(TEXT)
    np.testing.assert_allclose(data["layers"][0]["heads"][0]["weights"], ma.rollout(enc.attentions)[0], atol=1e-6)
    pytest.importorskip("matplotlib")
    assert run("demo", "--model", "builtin", "--view", "rollout", "--format", "png", "-o", str(tmp_path / "r.png"),
               TEXT).exit_code == 0
    res = run("demo", "--model", "builtin", "--view", "rollout", "--head", "1", TEXT)
    assert res.exit_code == 2 and "rollout mixes every head of each layer" in res.stderr


def test_demo_words_merges_pieces(minilm_512, monkeypatch):
    import mha_cli.demo as demo_cmd

    model, _, _ = minilm_512
    monkeypatch.setattr(demo_cmd, "load", lambda name, backend: model)
    text = "Lighthouse keepers trimmed wicks."
    res = run("demo", "--model", "minilm", "--words", "--layer", "0", "--head", "2", "--no-color", text)
    assert res.exit_code == 0, res.output
    labels = re.findall(r"^\s*\d+ (\S+)", res.stdout, re.M)
    assert "lighthouse" in labels and not any(t.startswith("##") for t in labels)
    data = json.loads(run("demo", "--model", "minilm", "--words", "--layer", "0", "--format", "json", text).stdout)
    assert data["tokens"] == ma.to_words(model.encode(text).attentions, model.encode(text).tokens)[1]
    np.testing.assert_allclose(np.array(data["layers"][0]["heads"][5]["weights"]).sum(-1), 1.0, atol=1e-5)
