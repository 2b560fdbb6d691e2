"""``mha generate``: the streamed terminal lines, the JSON summary, the HTML step view (bounded, and
working in a real browser when Chromium is installed), and bad input as one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import mha.models as mm
from mha_cli.main import cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Qwen2 with a 300-token BPE tokenizer (sliding layer 1: zeros outside its window)."""
    from tests.models import hf_zoo

    f = hf_zoo.build("qwen2", tmp_path_factory.mktemp("gen"), init=0.5, vocab_size=300)
    return hf_zoo.add_tokenizer(f, 300)


def _run(*args):
    return CliRunner().invoke(cli, ["generate", *args])


def test_term_streams_a_line_per_token_with_each_layers_strongest_head(folder):
    res = _run("The cat sat on the", "--model", str(folder), "--backend", "numpy", "-n", "5")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{folder.name}: 6 prompt tokens: '<s>The cat sat on the'")
    steps = [ln for ln in lines if " <- " in ln]
    assert len(steps) == 5 and all(ln.count(" | L1H") == 1 and " <- L0H" in ln for ln in steps)
    out = mm.load(folder, backend="numpy").generate("The cat sat on the", 5, attentions=True)
    assert lines[-1] == f"text: {out.text!r}"
    rows = out.attentions[2][0, :, -1]  # layer 0's row at step 2: the strongest head and its top key
    h = int(rows.max(-1).argmax())
    j = int(rows[h].argmax())
    assert f"L0H{h} {json.dumps(out.tokens[j])}({j}) {rows[h, j]:.2f}" in steps[2]


def test_one_head_shows_its_three_strongest_keys(folder):
    res = _run("The cat", "--model", str(folder), "-n", "2", "--layer", "1", "--head", "4")
    assert res.exit_code == 0, res.output
    steps = [ln for ln in res.output.splitlines() if " <- " in ln]
    assert len(steps) == 2 and all(ln.split(" <- ")[1].startswith("L1H4: ") for ln in steps)
    assert steps[1].count(") 0.") + steps[1].count(") 1.") == 3


def test_json_summarises_every_step(folder, tmp_path):
    out = tmp_path / "g.json"
    res = _run("The cat sat", "--model", str(folder), "-n", "4", "-o", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["prompt_length"] == 4 and len(data["steps"]) == 4 and data["num_layers"] == 2
    assert data["attention_shapes"] == [[2, 6, 4, 4], [2, 6, 1, 5], [2, 6, 1, 6], [2, 6, 1, 7]]
    first = data["steps"][1]["heads"][0][0]  # step 1, layer 0, head 0: 3 [position, weight], strongest first
    assert len(first) == 3 and first[0][1] >= first[1][1] >= first[2][1]


def test_html_writes_the_step_view_within_its_bound(folder, tmp_path):
    import mha.viz as mv

    out = tmp_path / "steps.html"
    res = _run("The cat sat on the", "--model", str(folder), "-n", "8", "-o", str(out))
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "<script type=\"application/json\" id=\"data\">" in page and "http" not in page.split("</head>")[1]
    data = json.loads(page.split('id="data">')[1].split("</script>")[0])
    assert data["rows"] == 6 + 8 - 1 and len(data["heads"]) == 12 and data["note"] is None
    gen = mm.load(folder, backend="numpy").generate("The cat sat on the", 8, attentions=True)
    full, one = mv.step_report(gen), mv.step_report(gen, max_bytes=1)  # every head; the first head only
    assert one.note.startswith("showing layer 0, head 0 (1 of 12 heads)")
    bound = one.size + 8 * (full.size - one.size) // 11  # room for 9 heads: whole layers first, so layer 0
    small = mv.step_report(gen, max_bytes=bound)
    assert small.size <= bound and small.note.startswith("showing layer 0 (6 of 12 heads) to stay within")
    rows = mv._steps.causal_rows(gen.attentions, 6)
    np.testing.assert_array_equal(rows[:, :, :6, :6], gen.attentions[0])
    np.testing.assert_array_equal(rows[:, :, 12, :13], gen.attentions[7][:, :, 0])


def test_bad_input_is_one_line(folder, tmp_path):
    for args, message in [(["x", "--model", str(tmp_path / "none")], "does not exist"),
                          (["x", "--model", str(folder), "--layer", "2"], "2 is out of range: "),
                          (["x", "--model", str(folder), "-n", "0"], "0 is not in the range x>=1"),
                          (["x", "--model", str(folder), "-n", "400"], "max_position_embeddings=64"),
                          (["x", "--model", str(folder), "--keep", "3"], "keep=3 needs a rotating cache")]:
        res = _run(*args)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium")
def test_the_step_view_works_in_a_browser(folder, tmp_path):
    sync = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "steps.html"
    assert _run("The cat sat on the", "--model", str(folder), "-n", "6", "-o", str(out)).exit_code == 0
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(out.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        assert page.locator("#step-label").text_content().startswith("step 0: \" the\" (5) -> ")
        page.click("#next")
        page.select_option("#layer", "1")
        page.select_option("#head", "2")
        gen = mm.load(folder, backend="numpy").generate("The cat sat on the", 6, attentions=True)
        want = gen.attentions[1][1, 2, 0]  # step 1, layer 1, head 2: the row of position 6
        shown = [float(page.locator(f'#tokens .t[data-i="{j}"]').get_attribute("data-weight")) for j in range(7)]
        np.testing.assert_allclose(shown, want, atol=1 / 255)
        assert page.locator(".t.query").get_attribute("data-i") == "6" and not errors
        browser.close()


def test_demo_and_heads_take_a_decoder_folder(folder):
    res = CliRunner().invoke(cli, ["demo", "--model", str(folder), "--backend", "numpy", "--format", "json",
                                   "--layer", "1", "The cat sat on the mat."])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # the model line goes to stderr
    w = np.array(data["layers"][0]["heads"][0]["weights"])
    assert data["tokens"][:2] == ["<s>", "The"] and not np.triu(w, 1).any()  # causal
    assert not np.tril(w, -4).any()  # layer 1 slides over 4 positions
    res = CliRunner().invoke(cli, ["heads", "--model", str(folder), "The cat sat on the mat.", "A dog ran."])
    assert res.exit_code == 0 and f"{folder.name}: 2 layers x 6 heads" in res.output, res.output


def _induction():
    try:
        return mm.load("induction", backend="numpy")
    except ValueError:
        return None


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium")
@pytest.mark.skipif(_induction() is None, reason="the induction model is not installed (mha/models/data/induction)")
def test_the_step_view_shows_the_induction_heads(tmp_path):
    """The shipped induction model continues a repeated sequence, its layer-1 heads looking at the token after
    the earlier copy of the query's token; with $MHA_SCREENSHOTS set, the page as docs/decoders_steps.png."""
    import os

    sync = pytest.importorskip("playwright.sync_api")
    prompt = "12 40 7 33 51 9 21 60 4 28 12 40 7"
    out = tmp_path / "steps.html"
    res = _run(prompt, "--model", "induction", "--backend", "numpy", "-n", "8", "-o", str(out))
    assert res.exit_code == 0, res.output
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 400})
        page.goto(out.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        for _ in range(3):
            page.click("#next")
        page.select_option("#layer", "1")
        assert page.locator("#step-label").text_content() == 'step 3: "t9" (15) -> "t21"'
        assert page.locator("#info").text_content().startswith('layer 1, head 0 (strongest): "t9" (15) attends to '
                                                                '"t21" (6) 1.00')
        if os.environ.get("MHA_SCREENSHOTS"):
            page.screenshot(path=os.path.join(os.environ["MHA_SCREENSHOTS"], "decoders_steps.png"))
        browser.close()


def test_token_labels_escape_what_a_terminal_would_act_on():
    from mha_cli.generate import _label

    assert _label("a\x7fb\x18c\u2028d\u0085 é") == '"a\\u007fb\\u0018c\\u2028d\\u0085 é"'
    assert all(c.isprintable() for c in _label("".join(map(chr, range(0x110)))))


def test_an_output_name_the_command_cannot_write_is_refused_before_any_work(folder, tmp_path):
    from click.testing import CliRunner

    from mha_cli.main import cli

    for args in (["-o", str(tmp_path / "out.txt")], ["--format", "term", "-o", str(tmp_path / "s.html")]):
        r = CliRunner().invoke(cli, ["generate", "1 2 3", "--model", folder, "-n", "2", *args])
        assert r.exit_code != 0 and r.output.count("\n") <= 3 and "Traceback" not in r.output, r.output
    assert not list(tmp_path.iterdir())


def test_sampling_flags_are_the_python_apis(folder, tmp_path):
    """--temperature/--top-k/--top-p/--seed give what model.generate gives with the same settings (the
    same text), the same seed twice the same tokens; --max-cache/--keep the rotating cache's text and a
    last step that attends the kept sinks plus the window (json: attention widths)."""
    model = mm.load(folder, backend="numpy")
    prompt, sample = "The cat sat on the", ["--temperature", "1.5", "--top-k", "3", "--top-p", "0.6"]
    texts = []
    for seed in ("3", "3", "4"):
        res = _run(prompt, "--model", str(folder), "--backend", "numpy", "-n", "8", *sample, "--seed", seed)
        assert res.exit_code == 0, res.output
        texts.append(res.output.splitlines()[-1])
    want = model.generate(prompt, 8, temperature=1.5, top_k=3, top_p=0.6, seed=3)  # each setting changes it here
    assert texts[0] == texts[1] == f"text: {want.text!r}"
    other = model.generate(prompt, 8, temperature=1.5, top_k=3, top_p=0.6, seed=4)
    assert texts[2] == f"text: {other.text!r}" != texts[0]
    out = tmp_path / "r.json"
    res = _run(prompt, "--model", str(folder), "--backend", "numpy", "-n", "6", "--max-cache", "5", "--keep", "2",
               "-o", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    rot = model.generate(prompt, 6, max_cache=5, keep=2, attentions=True)
    assert data["text"] == rot.text
    assert [s[-1] for s in data["attention_shapes"]] == [a.shape[-1] for a in rot.attentions]
    assert data["attention_shapes"][-1][-1] == 6 + 6 - 1  # absolute positions: prompt + 5 steps attended
    last = rot.attentions[-1][:, :, -1]  # (layers, H, positions): evicted positions hold zeros
    assert (last[..., 2:-4] == 0).all() and (last[0, :, :2].sum(-1) > 0).all()  # layer 0 sees its sinks
