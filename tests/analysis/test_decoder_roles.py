"""Decoder head roles against chance (mha.analysis.decoder_roles): a planted model with a known answer,
every score against a loop over its definition, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import mha.analysis as ma
import mha.models as mm
from mha.analysis import _decoder_roles as dr
from tests.analysis.planted import PLANTED, RANDOM, UNIFORM, planted_decoder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return mm.load(planted_decoder(tmp_path_factory.mktemp("planted") / "model"), backend="numpy")


@pytest.fixture(scope="module")
def table(planted):
    return ma.decoder_roles(planted, sequences=24, length=7)


def test_planted_heads_come_first_in_their_roles(table):
    """Each planted head is named for its role, leads that role's ranking by excess score - chance, and
    clears chance by more than 0.5 with its whole interval."""
    by = {(r.layer, r.head): r for r in table.heads}
    for (layer, head), role in PLANTED.items():
        r = by[layer, head]
        assert r.role == role and r.specialised
        assert r.score - r.chance > 0.5 and r.ci[0] - r.chance > 0.5, (role, r)
        top = table.ranking(role)[0]
        assert (top.layer, top.head) == (layer, head)
        runner_up = table.ranking(role)[1]
        assert runner_up.scores[role] - runner_up.chances[role] < 0.1


def test_unplanted_heads_sit_at_chance(table):
    """A head with zero query weights attends uniformly: every role's score equals its chance and chance
    lies in its interval (so the baselines are the uniform head's scores, not an approximation). Small
    random heads are broad, never specialised, within 0.01 of chance in every role."""
    by = {(r.layer, r.head): r for r in table.heads}
    for key in UNIFORM:
        r = by[key]
        assert r.role == "broad" and not r.specialised
        for role in table.roles:
            lo, hi = r.intervals[role]
            assert abs(r.scores[role] - r.chances[role]) < 1e-6, role  # float32 weights
            assert lo - 1e-6 <= r.chances[role] <= hi + 1e-6, role
    for key in RANDOM:
        r = by[key]
        assert r.role == "broad" and not r.specialised
        assert max(abs(r.scores[k] - r.chances[k]) for k in table.roles) < 0.01


def test_kv_groups_pool_their_query_heads(table):
    """GQA: a group record is the mean of its query heads' scores; the planted head's group takes its role."""
    for g in table.groups:
        members = [r for r in table.heads if r.layer == g.layer and r.kv_head == g.kv_head]
        assert g.head is None and g.heads == tuple(r.head for r in members) and len(members) == 2
        for role in table.roles:
            assert g.scores[role] == pytest.approx(np.mean([r.scores[role] for r in members]), abs=1e-12)
    roles = {(g.layer, g.kv_head): g.role for g in table.groups}
    assert roles == {(0, 0): "previous", (0, 1): "duplicate", (1, 0): "first", (1, 1): "induction"}


def test_chance_is_uniform_attention_over_the_visible_keys(table):
    """Chance against sums written out for the probe's T = 14 positions (rows 1..13)."""
    i = np.arange(1, 14)
    assert table.heads[0].chances["previous"] == pytest.approx(np.mean(1 / (i + 1)))
    assert table.heads[0].chances["local"] == pytest.approx(np.mean(np.minimum(i, 4) / (i + 1)))
    second = np.arange(7, 14)  # queries with one earlier copy, among i + 1 visible keys
    assert table.heads[0].chances["induction"] == pytest.approx(np.mean(1 / (second + 1)))
    assert table.heads[0].chances["duplicate"] == table.heads[0].chances["induction"]


def _causal(rng, shape, T, sink: bool):
    """Random causal weights (..., T, T); rows sum to 1, or to 1 - a random sink share."""
    logits = rng.normal(0, 2, shape + (T, T + sink))
    logits[..., :T][..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p[..., :T]


@pytest.mark.parametrize("sink", [False, True])
def test_scores_against_loops_over_their_definitions(sink):
    rng = np.random.default_rng(3)
    T = 9
    A = _causal(rng, (2, 3), T, sink)
    ids = rng.integers(0, 4, size=(2, T))  # small vocabulary: several earlier copies
    got = dr.positional_scores(A, sink)
    rep, _ = dr.repeat_scores(A[:, None], ids)  # (B, 1 layer, 3 heads)
    for b in range(2):
        for h in range(3):
            P = A[b, h]
            want = {k: [] for k in ("previous", "self", "first", "local", "broad", "sink", "dup", "ind")}
            dup, ind = [], []
            for q in range(1, T):
                want["previous"].append(P[q, q - 1])
                want["self"].append(P[q, q])
                want["first"].append(P[q, 0])
                want["local"].append(sum(P[q, j] for j in range(q) if 1 <= q - j <= 4))
                row = list(P[q, :q + 1]) + ([1 - P[q].sum()] if sink else [])
                want["broad"].append(-sum(p * np.log(p) for p in row if p > 0) / np.log(len(row)))
                want["sink"].append(1 - P[q].sum())
            for q in range(T):
                copies = [j for j in range(q) if ids[b, j] == ids[b, q]]
                if copies:
                    dup.append(sum(P[q, j] for j in copies))
                    ind.append(sum(P[q, j + 1] for j in copies))
            for k in ("previous", "self", "first", "local", "broad") + (("sink",) if sink else ()):
                assert got[k][b, h] == pytest.approx(np.mean(want[k]), abs=1e-12), k
            assert rep["duplicate"][b, 0, h] == pytest.approx(np.mean(dup), abs=1e-12)
            assert rep["induction"][b, 0, h] == pytest.approx(np.mean(ind), abs=1e-12)
    assert ("sink" in got) == sink


def test_head_roles_of_a_decoder_model(planted):
    """head_roles(model) gives the decoder table's per-head records (DESIGN.md's function, decoders too)."""
    roles = ma.head_roles(planted, sequences=8, length=7)
    assert len(roles) == 8 and all(isinstance(r, ma.DecoderRole) for r in roles)
    assert {(r.layer, r.head): r.role for r in roles if r.role != "broad"} == PLANTED
    with pytest.raises(TypeError, match="needs the tokens"):
        ma.head_roles(np.zeros((1, 1, 3, 3)))


def test_positional_roles_on_texts(planted):
    """With texts (here id sequences of an ids-only model) the positional roles come from them: the
    previous-token head keeps its role; induction still comes from the random sequences."""
    texts = ["3 1 4 1 5 9 2 6", "2 7 1 8 2 8 1 8 2 8", "1 2 3 4 5 6 7 8 9 10 11 12"]
    t = ma.decoder_roles(planted, texts, sequences=8, length=7)
    assert t.texts == 3 and t.heads[0].role == "previous"
    T = np.array([8, 10, 12])
    want = np.mean([np.mean(1 / (np.arange(1, n) + 1)) for n in T])
    assert t.heads[0].chances["previous"] == pytest.approx(want)
    assert t.ranking("induction")[0].head == 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sequences=1), ValueError, "sequences must be an int >= 2"),
    (dict(length=1.5), TypeError, "length must be an int"),
    (dict(length=9), ValueError, "length=9: .* 18 positions .* max_position_embeddings=16; use length <= 8"),
    (dict(texts=["1 2 3"]), ValueError, "at least 2"),
])
def test_bad_input_is_refused_before_any_work(planted, kwargs, error, match):
    with pytest.raises(error, match=match):
        ma.decoder_roles(planted, **kwargs)


def test_mha_heads_on_a_decoder_folder(planted, tmp_path):
    from cli.main import cli

    folder = planted_decoder(tmp_path / "m")
    res = CliRunner().invoke(cli, ["heads", "--model", str(folder), "--length", "7", "--sequences", "8", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    heads = {(r["layer"], r["head"]): r for r in data["heads"]}
    assert heads[1, 2]["role"] == "induction" and heads[1, 2]["chance"] < 0.2
    assert heads[1, 2]["ci"][0] > heads[1, 2]["chance"] + 0.5 and len(data["kv_groups"]) == 4
    res = CliRunner().invoke(cli, ["heads", "--model", str(folder), "--length", "7", "--sequences", "8"])
    assert res.exit_code == 0 and "induction L1H2" in res.stdout and "previous L0H0" in res.stdout
    res = CliRunner().invoke(cli, ["heads", "--model", str(folder), "--length", "7", "--role", "content"])
    assert res.exit_code == 2 and "for a decoder" in res.output
    res = CliRunner().invoke(cli, ["heads", "--model", str(folder), "--length", "30"])
    assert res.exit_code == 2 and "use length <= 8" in res.output and "Traceback" not in res.output


def test_the_shipped_induction_model_names_its_induction_heads():
    """training's model (mha.models.load("induction")): its best induction head is named "induction" and
    leads that role; layer 0 holds none (the circuit needs two layers)."""
    model = mm.load("induction", backend="numpy")
    table = ma.decoder_roles(model, sequences=16)
    best = table.ranking("induction")[0]
    assert best.layer == 1 and best.role == "induction" and best.score - best.chance > 0.8
    assert all(r.role != "induction" for r in table.heads if r.layer == 0)
