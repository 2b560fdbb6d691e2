"""What a newcomer meets in the first hour, held to it: output that fits 100 columns (no CLI line past 120),
the suite's report showing each failure's example and a rerun that replays it, `mha check` on your own
adapter as module:factory or path/file.py:factory, progress and --quick for the long commands, role
names a reader understands, and PNG text taken literally under a pixel cap."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mha.analysis as ma
import mha.models as mm
from mha_cli.main import cli

from tests.helpers import tiny_bert

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "check_my_attention.py"
TEXT = "The cat sat on the mat and the cat slept."


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


# --- roles --------------------------------------------------------------------------------------------


def test_the_constructed_same_word_head_is_same_word():
    """The built-in "same word" head was labelled "first" at 0.65 (where it looks when its word does not
    recur); it is "same_word" now, with every copy's row on the other copies."""
    enc = mm.load_model("builtin").encode(TEXT)
    roles = {r.head: r for r in ma.head_roles(enc.attentions, enc.tokens)}
    assert roles[5].role == "same_word" and roles[5].score > 0.99
    assert [roles[h].role for h in (0, 1, 2, 3, 6, 7)] == ["previous", "next", "self", "first", "last", "broad"]
    P = enc.attentions[0, 5].astype(np.float64)  # the score by hand: rows of "the" and "cat", weight on their copies
    rows = [i for i, t in enumerate(enc.tokens) if enc.tokens.count(t) > 1 and t not in ("[CLS]", "[SEP]")]
    by_hand = np.mean([sum(P[i, j] for j, t in enumerate(enc.tokens) if t == enc.tokens[i] and j != i) for i in rows])
    assert roles[5].scores["same_word"] == pytest.approx(by_hand)


def _band(L: int, width: int) -> np.ndarray:
    """(L, L) rows spread evenly over the keys 2..width positions away (neither the neighbours nor itself)."""
    d = np.abs(np.arange(L)[:, None] - np.arange(L)[None, :])
    P = ((d >= 2) & (d <= width)).astype(np.float64)
    return P / P.sum(-1, keepdims=True)


def test_a_head_spread_over_its_neighbourhood_is_local():
    """Heads spread over the tokens around the query came out "content"; "local" only where 9 positions are
    at most half the text (18+ tokens), else uniform attention would pass for it."""
    for L, expected in ((40, "local"), (12, "content")):
        toks = ["[CLS]"] + [f"w{i}" for i in range(L - 2)] + ["[SEP]"]
        P = _band(L, 4)
        role = ma.head_roles(P[None, None], toks)[0]
        assert role.role == expected, (L, role)
        assert np.isnan(ma.role_scores(P, toks)["local"]) == (L < 18)
    toks = ["[CLS]"] + [f"w{i}" for i in range(38)] + ["[SEP]"]
    assert ma.head_roles(np.full((1, 1, 40, 40), 1 / 40), toks)[0].role == "broad"  # uniform stays broad


def test_role_filter_lists_without_changing_counts_or_means():
    """--role listed fewer heads and changed the per-layer means and counts printed under them."""
    every = run("heads", "--model", "builtin", "--quick")
    only = run("heads", "--model", "builtin", "--quick", "--role", "broad")
    assert every.exit_code == only.exit_code == 0, only.output
    table = lambda out: [ln for ln in out.splitlines() if ln.startswith(("layer 0 ", "roles: "))]  # noqa: E731
    assert table(every.stdout) == table(only.stdout) and len(table(every.stdout)) == 2
    rows = lambda out: [ln for ln in out.splitlines() if re.match(r"^ +0 +\d ", ln)]  # noqa: E731
    assert len(rows(every.stdout)) == 8 and len(rows(only.stdout)) == 1 and "listed: 1 of 8 heads" in only.stdout
    assert "same_word: other copies of its own word" in " ".join(every.stdout.split())  # each role, in words


def test_heads_quick_and_progress_on_a_corpus():
    res = run("heads", "--model", "builtin", "--quick", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["sentences"] == 40
    assert "--quick: the first 40 of 148 sentences" in res.stderr
    assert "encoding 40 sentences: 0/40" in res.stderr and "encoding 40 sentences: done in" in res.stderr


# --- progress, quick, widths ------------------------------------------------------------------------


def test_prune_shows_progress_and_has_a_quick_mode():
    """mha prune gave no sign of life for 42 s in a log (click's bar draws only on a terminal)."""
    res = run("prune", "--model", "builtin", "--quick", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [s["fraction"] for s in data["by_importance"]][1:] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert len(data["random"]) == 1 and data["sentences"] == 16 and data["importance_sentences"] == 16
    assert re.search(r"^mha prune: 0/\d+ \.\.\.$", res.stderr, re.M) and "mha prune: done in" in res.stderr


@pytest.mark.parametrize("args", [
    ["demo", "--model", "builtin", "--no-color", TEXT * 3],
    ["demo", "--model", "builtin", "--no-color", "--top", "3", "--view", "rollout", TEXT],
    ["heads", "--model", "builtin", TEXT, "A second sentence, with a comma."],
    ["heads", "--model", "builtin", "--quick"],
    ["check", "--list"],
    ["check", "--impl", "numpy", "--impl", "numpy-blocks", "--property", "reference", "--property", "causal_prefix",
     "--examples", "2"],
    ["info"],
])
def test_output_fits_the_terminal(args):
    """Every line fits 100 columns (the terminal views: the width they are given, here 120)."""
    res = run(*args, env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    limit = 120 if args[0] == "demo" else 100
    assert widest(res.stdout) <= limit and widest(res.stderr) <= limit, (widest(res.stdout), res.stdout[:3000])


def test_a_wide_check_table_is_folded():
    """`mha check --impl zoo` printed 237-column lines and a 15,000-character line of n/a."""
    from mha.testing import Report
    from mha_cli.check import _table

    names = ["reference", "permutation_equivariance", "causal_prefix", "weights_contract"]
    impls = [f"peer-number-{k}" for k in range(13)]
    reports = [Report(i, [(n, ("pass", "fail", "n/a", "pass")[(k + j) % 4],
                           "needs causal (no causal flag: the caller builds the mask)" if (k + j) % 4 == 2 else
                           "weights vs oracle: |difference| 1 > tolerance 1e-06\nfalsifying example: Problem(B=1, T=2)"
                           if (k + j) % 4 == 1 else "") for j, n in enumerate(names)]) for k, i in enumerate(impls)]
    import click.testing

    runner = click.testing.CliRunner()
    with runner.isolation() as (out, _, _):
        _table(reports, [f"zoo-{k}" for k in range(13)])
        text = out.getvalue().decode()
    assert widest(text) <= 100, text
    assert "peer-number-1 FAILS reference" in text and "rerun: mha check --impl zoo-1 --property reference" in text
    assert "[13] peer-number-12" in text and text.count("property") >= 2  # numbered columns, in blocks
    assert text.count("needs causal") == 0 and "need features" in text  # the n/a reasons grouped


# --- the suite's report and mha check on your own code ---------------------------------------------


def test_report_shows_the_example_and_a_rerun_that_replays_it():
    """print(report) showed only the failing property's name."""
    from mha.testing import check, run_property
    from tests.suite.synthetic_attention import correct, planted_scale

    report = check(planted_scale(), properties=["reference", "default_scale", "head_mask_scales_heads"],
                   max_examples=20)
    text = str(report)
    assert text.startswith("synthetic-scale: 1 pass, 1 FAIL, 1 n/a") and widest(text) <= 100, text
    assert re.search(r"FAIL reference: output vs float64 oracle: \|difference\| \S+ > tolerance \S+ at \(", text)
    assert "got " in text and "expected " in text and "np.float64" not in text  # the offending values, readable
    assert re.search(r"example: Problem\(B=\d+, T=\d+, S=\d+, H=\d+", text)  # the shrunk example's shapes
    assert "n/a: 1 need features synthetic-scale does not declare (head_mask)" in text
    blob = re.search(r"rerun: run_property\(impl, 'reference', reproduce='([^']+)'\)", text).group(1)
    with pytest.raises(AssertionError, match="output vs float64 oracle"):
        run_property(planted_scale(), "reference", reproduce=blob)  # exactly that example, again
    with pytest.raises(Exception, match="Expected the test to raise"):
        run_property(correct(), "reference", reproduce=blob)  # which a correct implementation passes


def test_mha_check_takes_your_module_or_file(tmp_path):
    """`mha check --impl mymod:factory`, as the README shows (the CLI refused it), and path/to/file.py:factory;
    a failure of your own code exits 1 and says how to rerun it."""
    shutil.copy(EXAMPLE, tmp_path / "mymod.py")
    (tmp_path / "sub").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "sub" / "mine.py")
    args = ["--property", "empty_rows_output_bias", "--property", "permutation_equivariance", "--examples", "10"]
    for spec in ("mymod:adapter", "sub/mine.py:adapter"):
        res = subprocess.run([sys.executable, "-m", "mha_cli", "check", "--impl", spec, *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "MHA_EXAMPLE_FIXED": "0"})
        assert res.returncode == 1, res.stdout + res.stderr
        assert "my_attention FAILS empty_rows_output_bias" in res.stdout and "Traceback" not in res.stderr
        assert f"rerun: mha check --impl {spec} --property empty_rows_output_bias" in res.stdout
        assert re.search(r"^permutation_equivariance +pass", res.stdout, re.M) and widest(res.stdout) <= 100


def test_check_list_json():
    """`mha check --list --json` printed text."""
    res = run("check", "--list", "--json")
    from mha.testing.properties import PROPERTIES

    data = json.loads(res.stdout)
    assert [p["name"] for p in data] == list(PROPERTIES) and {"theme", "summary", "requires"} <= set(data[0])


# --- PNG ------------------------------------------------------------------------------------------


def test_png_text_is_literal(tmp_path):
    """A folder name or a token like $\\frac$ went through matplotlib's mathtext and raised."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tokenizers")
    folder = tiny_bert(tmp_path / "$\\frac$")
    out = tmp_path / "h.png"
    res = run("demo", "--model", str(folder), "-o", str(out), "a $b^$ c")
    assert res.exit_code == 0 and out.read_bytes()[:4] == b"\x89PNG", res.output


def test_png_has_a_pixel_cap_whatever_the_dpi(tmp_path):
    """dpi=1100 wrote a 489-megapixel PNG (3.4 GB); dpi=5000 died with std::bad_alloc."""
    pytest.importorskip("matplotlib")
    import mha.viz as mv

    enc = mm.load_model("builtin").encode(TEXT)
    data = mv.to_data(enc, arrays=True)
    for dpi in (1100, 5000):
        with pytest.raises(ValueError, match=rf"at dpi {dpi} is past 16 megapixels"):
            mv.save_png(data, tmp_path / "big.png", dpi=dpi)
    for dpi in (0, -3, float("nan"), "high"):
        with pytest.raises(ValueError, match="dpi must be a positive number"):
            mv.save_png(data, tmp_path / "big.png", dpi=dpi)
    assert not (tmp_path / "big.png").exists()
    mv.save_png(data, tmp_path / "ok.png", dpi=55)  # a lower dpi is fine
    assert (tmp_path / "ok.png").stat().st_size > 1000
