"""The HTML head view in a real browser (Debian's headless Chromium via Playwright): it renders offline,
hovering a token highlights what it attends to, and hostile text shows as text without running."""

from __future__ import annotations

import os
import shutil

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
def page():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        pg = browser.new_page()
        requests = []
        pg.on("request", lambda r: requests.append(r.url) if not r.url.startswith("file:") else None)
        dialogs = []
        pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        pg.requests, pg.dialogs = requests, dialogs
        yield pg
        browser.close()


def _export(tmp_path, text, *args):
    out = tmp_path / "view.html"
    res = CliRunner().invoke(cli, ["demo", "--model", "builtin", "--backend", "numpy", "--format", "html",
                                   "-o", str(out), *args, text])
    assert res.exit_code == 0, res.output
    return out


def _open(page, path):
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)  # weights are unpacked asynchronously


def test_hover_highlights_what_a_token_attends_to(page, tmp_path):
    out = _export(tmp_path, "The cat sat on the mat.")
    _open(page, out)
    assert page.locator("#heads button").count() == 8
    page.hover('g.tok[data-side="left"][data-i="2"]')  # "cat", with head 0 (previous token) selected
    hl = page.locator('g.tok.hl[data-side="right"]')
    assert hl.count() == 1 and hl.get_attribute("data-i") == "1"  # -> "the"
    assert float(hl.get_attribute("data-weight")) > 0.99
    page.click('#heads button[data-head="3"]')  # add the first-token head
    page.hover('g.tok[data-side="left"][data-i="4"]')  # "on"
    targets = sorted(page.locator('g.tok.hl[data-side="right"]').evaluate_all("els => els.map(e => e.dataset.i)"))
    assert targets == ["0", "3"]  # [CLS] (first-token head) and "sat" (previous-token head)
    page.hover('g.tok[data-side="right"][data-i="0"]')  # who attends to [CLS]?
    assert page.locator('g.tok.hl[data-side="left"]').count() == 9  # every query, through head 3
    assert page.requests == []  # nothing fetched from anywhere


def test_hostile_text_is_shown_not_run(page, tmp_path):
    out = _export(tmp_path, HOSTILE)
    _open(page, out)
    assert page.evaluate("window.pwned") is None and page.dialogs == []
    assert page.locator("#text").text_content() == HOSTILE
    labels = page.locator('g.tok[data-side="left"] text').all_text_contents()
    assert "<" in labels and "script" in labels and "img" in labels
    assert page.locator("img").count() == 0 and page.locator("body script").count() == 2
    assert page.title() == "Attention head view: " + HOSTILE[:80]  # the title shows the text, literally


def test_a_512_token_page_opens_in_seconds(page, minilm_512, tmp_path):
    import time

    import mha.viz as mv

    _, enc, text = minilm_512
    out = tmp_path / "long.html"
    out.write_text(mv.render_html(mv.to_data(enc, text=text, arrays=True)), encoding="utf-8")
    assert out.stat().st_size <= 8 * 2**20  # was 177 MB, which crashed headless Chromium
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    start = time.perf_counter()
    _open(page, out)
    assert time.perf_counter() - start < 3.0
    assert errors == [] and page.locator("#heads button").count() == 12
    page.hover('g.tok[data-side="left"][data-i="300"]')  # layer 0 head 0: spread thin, shown, not blank
    assert float(page.locator('g.tok[data-side="right"][data-i="299"]').get_attribute("data-weight")) > 0
