"""The HTML report in a real browser (Debian's headless Chromium via Playwright, `executable_path` set):
it renders offline; the model view's thumbnails open the head view; hovering a token highlights what
it attends to; words, rollout and the token window work; hostile text shows as text without running;
and a 512-token MiniLM report loads in under 3 s without console errors."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import time

import pytest
from click.testing import CliRunner

from mha_cli.main import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api") if CHROMIUM or os.environ.get("CI") else None

if not CHROMIUM:
    if os.environ.get("CI"):
        pytest.fail("CI must provide chromium (apt-get install chromium)", pytrace=False)
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = 'The <script>window.pwned=1</script> cat sat <img src=x onerror="window.pwned=2"> & "mat".'


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.requests, pg.dialogs, pg.errors = [], [], []
    pg.on("request", lambda r: pg.requests.append(r.url) if not r.url.startswith(("file:", "blob:")) else None)
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    yield pg
    pg.close()


def _export(tmp_path, text, *args):
    out = tmp_path / "report.html"
    res = CliRunner().invoke(cli, ["demo", "--model", "builtin", "--backend", "numpy", "--format", "html",
                                   "-o", str(out), *args, text])
    assert res.exit_code == 0, res.output
    return out


def _open(page, path):
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)  # thumbnails are drawn asynchronously


def test_model_view_opens_a_head_and_hover_highlights(page, tmp_path):
    _open(page, _export(tmp_path, "The cat sat on the mat."))
    cells = page.locator("#model .thumb")
    assert cells.count() == 8 and cells.nth(0).get_attribute("data-role") == "previous"
    assert page.locator("#model .thumb").nth(7).text_content() == "broad 1.00"
    cells.nth(0).click()  # head 0: previous token
    page.wait_for_selector("#head:not([hidden]) g.tok")
    assert page.locator("#head-title").text_content().startswith("layer 0, head 0 (previous token)")
    page.hover('g.tok[data-side="left"][data-i="2"]')  # "cat"
    hl = page.locator('g.tok.hl[data-side="right"]')
    assert hl.count() == 1 and hl.get_attribute("data-i") == "1"  # -> "the"
    assert float(hl.get_attribute("data-weight")) > 0.99
    assert page.locator("#info").text_content().startswith("cat (2) attends to: the (1) 1.00")
    page.hover('g.tok[data-side="right"][data-i="0"]')  # who attends to [CLS] through head 0? "the" only
    assert page.locator('g.tok.hl[data-side="left"]').evaluate_all("els => els.map(e => e.dataset.i)") == ["0", "1"]
    page.click("#head-next")  # head 1: next token
    page.hover('g.tok[data-side="left"][data-i="2"]')
    assert page.locator('g.tok.hl[data-side="right"]').get_attribute("data-i") == "3"
    with page.expect_download() as saved:  # "save as image", which bertviz users have asked for since 2019
        page.click('#head button.save')
    assert saved.value.suggested_filename == "head-L0-H1.png"
    assert saved.value.path().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.requests == [] and page.errors == []  # nothing fetched from anywhere


def test_rollout_view_and_token_window(page, tmp_path):
    _open(page, _export(tmp_path, "word " * 40, "--view", "rollout"))
    assert page.locator("#rollout").is_visible() and page.locator("#model").is_hidden()
    assert page.locator("#roll-caption").text_content().startswith("Rollout through layers 0-0")
    page.click('#tabs button[data-view="head"]')
    page.select_option("#win-size", "16")
    page.fill("#win-start", "20")
    page.dispatch_event("#win-start", "change")
    labels = page.locator('g.tok[data-side="left"]').evaluate_all("els => els.map(e => +e.dataset.i)")
    assert labels == list(range(20, 36)) and page.locator("#win-info").text_content() == "tokens 20-35 of 42"
    assert page.errors == []


def test_hostile_text_is_shown_not_run(page, tmp_path):
    _open(page, _export(tmp_path, HOSTILE))
    page.locator("#model .thumb").nth(0).click()
    page.wait_for_selector("#head:not([hidden]) g.tok")
    assert page.evaluate("window.pwned") is None and page.dialogs == []
    assert page.locator("#text").text_content() == HOSTILE
    labels = page.locator('g.tok[data-side="left"] text').all_text_contents()
    assert "<" in labels and "script" in labels and "img" in labels
    assert page.locator("img").count() == 0 and page.locator("body script").count() == 2
    assert page.title() == "Attention report: " + HOSTILE[:80]  # the title shows the text, literally


def test_a_512_token_report_loads_in_seconds(page, minilm_512_report, tmp_path):
    out = tmp_path / "long.html"
    report = minilm_512_report
    report.save(out)
    assert out.stat().st_size <= 8 * 2**20 and report.note is None  # was 177 MB, which crashed Chromium
    start = time.perf_counter()
    _open(page, out)
    assert time.perf_counter() - start < 3.0
    thumbs = page.locator("#model .thumb")
    assert thumbs.count() == 72 and page.errors == []
    page.click('#model .thumb[data-layer="3"][data-head="5"]')
    page.wait_for_selector("#head:not([hidden]) g.tok")
    assert page.locator("#head-title").text_content().startswith("layer 3, head 5")
    assert page.locator('g.tok[data-side="left"]').count() == 48  # the window, not 512 rows
    tokens = page.locator('g.tok[data-side="left"] text').all_text_contents()
    page.check("#words")  # pieces merged: "beacon" "##s" -> "beacons"
    page.locator("#win-info", has_text=re.compile("^words")).wait_for()
    words = page.locator('g.tok[data-side="left"] text').all_text_contents()
    assert "##s" in tokens and "beacons" in words and not any(w.startswith("##") for w in words)
    page.click('#tabs button[data-view="rollout"]')
    page.locator("#roll-caption", has_text="layers 0-5").wait_for()
    assert page.errors == [] and page.requests == []


def _screenshot(page, name):
    """A screenshot of the page (also kept in $MHA_SCREENSHOTS when set, to look at); it is not blank."""
    import io

    from PIL import Image

    png = page.screenshot()
    if os.environ.get("MHA_SCREENSHOTS"):
        (pathlib.Path(os.environ["MHA_SCREENSHOTS"]) / f"{name}.png").write_bytes(png)
    pixels = Image.open(io.BytesIO(png)).convert("L")
    assert max(pixels.getextrema()) - min(pixels.getextrema()) > 100, name  # not one flat colour


def _read_head_view(page, n, name):
    """What a reader needs in the head view of an n-token report: the overview of the whole text first
    (on screen, left of the heat map), token labels on both axes of the heat map (every k-th when the
    window is long), and the hover naming a cell."""
    page.click('#model .thumb[data-layer="0"][data-head="2"]' if n > 20 else "#model .thumb >> nth=0")
    page.wait_for_selector("#head:not([hidden]) g.tok")
    ov, hm = page.locator("#head-overview").bounding_box(), page.locator("#head-map").bounding_box()
    assert ov["y"] + 40 < 1000 and ov["x"] < hm["x"], (ov, hm)  # the overview first, above the fold
    window = min(48, n)
    assert int(page.locator("#head-map").get_attribute("data-labels")) == len(range(0, window,
                                                                                   -(-13 // max(4, min(24, 420 // window)))))
    _screenshot(page, f"head-view-{name}-tokens")
    page.select_option("#win-size", "128")  # a long window: labels thinned, never overlapping
    labels = int(page.locator("#head-map").get_attribute("data-labels"))
    assert 0 < labels < min(n, 128) / 2 if n > 64 else labels == n


def test_views_are_readable_at_10_and_100_tokens(page, minilm_512, tmp_path):
    model = minilm_512[0]
    for n, text in ((10, "The cat sat on the warm mat."), (100, " ".join(minilm_512[2].split()[:80]))):
        out = tmp_path / f"r{n}.html"
        model_enc = model.encode(text)
        assert len(model_enc.tokens) == 10 if n == 10 else 90 <= len(model_enc.tokens) <= 110
        import mha.viz as mv

        mv.report(model_enc).save(out)
        _open(page, out)
        _screenshot(page, f"model-view-{n}-tokens")
        _read_head_view(page, len(model_enc.tokens), f"{n}")
        assert page.errors == []


def test_view_state_survives_toggles_and_role_filters_filter(page, minilm_512_report, tmp_path):
    """The words toggle keeps the window on the same part of the text (it went back to the start); the role
    filter hides the other heads and leaves the role counts as they were; a 512-token page shows its
    overview first."""
    out = tmp_path / "long.html"
    minilm_512_report.save(out)
    _open(page, out)
    counts = page.locator("#role-counts").text_content()
    assert counts.startswith("roles of the 72 heads: broad ")
    page.select_option("#role-filter", "local")
    visible = page.locator("#model .thumb:not(.off)")
    assert visible.count() == int(re.search(r"local (\d+)", counts).group(1)) > 0
    assert set(visible.evaluate_all("els => els.map(e => e.dataset.role)")) == {"local"}
    assert page.locator("#role-counts").text_content() == counts  # filtering does not change the statistics
    _screenshot(page, "model-view-512-tokens-local-heads")
    page.select_option("#role-filter", "")
    assert page.locator("#model .thumb.off").count() == 0
    _read_head_view(page, 512, "512")
    page.select_option("#win-size", "48")
    page.fill("#win-start", "300")
    page.dispatch_event("#win-start", "change")
    assert page.locator("#win-info").text_content() == "tokens 300-347 of 512"
    first = page.locator('g.tok[data-side="left"] text').first.text_content()
    page.check("#words")
    page.locator("#win-info", has_text=re.compile("^words")).wait_for()
    start = int(re.search(r"words (\d+)-", page.locator("#win-info").text_content()).group(1))
    assert 250 <= start <= 300  # the same place in the text, counted in words (was: back to word 0)
    assert first.lstrip("#") in page.locator('g.tok[data-side="left"] text').first.text_content()
    page.uncheck("#words")
    page.locator("#win-info", has_text=re.compile("^tokens")).wait_for()
    assert page.locator("#win-info").text_content() == "tokens 300-347 of 512"
    page.click('#tabs button[data-view="rollout"]')
    page.locator("#roll-caption", has_text="layers 0-5").wait_for()
    assert page.locator("#win-info").text_content() == "tokens 300-347 of 512"  # kept across views
    _screenshot(page, "rollout-512-tokens")
    assert page.errors == []
