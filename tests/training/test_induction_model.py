"""The shipped "induction" model (mha/models/data/induction) and the example that trained it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mha
import mha.analysis as ma
from mha.training import AttnOnlyDecoder

FOLDER = Path(mha.__file__).parent / "models" / "data" / "induction"
EXAMPLE = Path(__file__).parents[2] / "examples" / "train_induction.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_induction", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_model_has_an_induction_head():
    """Its best head scores at least 0.9 on fresh repeated random sequences (seeds the training never
    saw), far above chance; layer 0 holds none (the mechanism needs two layers)."""
    m = AttnOnlyDecoder.load(FOLDER)
    assert m.config["model_type"] == "mha_attn_only" and (FOLDER / "README.md").is_file()
    for seed in (1234, 99):
        probe = ma.repeated_tokens(48, 24, m.config["vocab_size"], seed=seed)
        _, att = m.forward(probe, attentions=True)
        scores, chance = ma.induction_scores(np.moveaxis(att, 1, 0), probe, return_chance=True)
        assert scores.max() >= 0.9 and scores[0].max() < 0.2 and chance < 0.1, scores
    logits = m.logits(probe[0])  # it predicts the repeat
    assert (logits[24:-1].argmax(-1) == probe[0, 25:]).mean() > 0.9


def test_shipped_files_are_the_family_and_small():
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["positions"] == "learned" and config["num_hidden_layers"] == 2
    assert (FOLDER / "model.safetensors").stat().st_size < 400_000


def test_example_trains_and_writes(tmp_path, monkeypatch):
    """A short run of the example: the loss falls, the model folder, its card and the figure are written."""
    mod = _example()
    model, history = mod.main(["--steps", "120", "--eval-every", "60", "--out", str(tmp_path / "m"),
                               "--plot", str(tmp_path / "f.png")])
    loss = np.array(history["loss"])
    assert loss[-20:].mean() < loss[:20].mean() - 0.03
    assert (tmp_path / "f.png").stat().st_size > 10_000
    card = (tmp_path / "m" / "README.md").read_text()
    assert "--steps 120" in card and "layer 1:" in card
    assert np.array_equal(AttnOnlyDecoder.load(tmp_path / "m").logits(np.arange(5)), model.logits(np.arange(5)))


@pytest.mark.slow
def test_full_training_reproduces_the_induction_head():
    """The shipped model's training, from scratch (about 90 s on 2 cores): best head >= 0.9."""
    _, history = _example().train(3000, 32, 5e-3, 0, "numpy", 1000)
    assert np.max(history["scores"][-1]) >= 0.9


def test_loader_gives_the_training_forward():
    """mha.models.load (the decoders' loader of the mha_attn_only family) on the shipped folder and by the
    name "induction": its logits equal the training forward's, on both backends' layers."""
    import mha.models as mm

    ids = ma.repeated_tokens(2, 12, 64, seed=5)
    ours = AttnOnlyDecoder.load(FOLDER).logits(ids)
    for model in (mm.load(FOLDER, backend="numpy"), mm.load("induction", backend="numpy")):
        theirs = np.asarray(model.logits(ids))
        assert theirs.shape == ours.shape and np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()
    assert mm.load("induction").vocab_size == 64


def test_gradients_benchmark_runs(tmp_path):
    """benchmarks/gradients.py at a tiny size, in a process of its own (it sets torch's and numpy's threads):
    both sides run and agree, and the JSON is written."""
    pytest.importorskip("torch")
    script = EXAMPLE.parents[1] / "benchmarks" / "gradients.py"
    res = subprocess.run([sys.executable, str(script), "--shapes", "2,16", "--E", "16", "--H", "2", "--rounds", "1",
                          "--causal", "--json", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((tmp_path / "g.json").read_text())["results"][0]
    assert row["causal"] is True and row["grad_x_agreement"] < 1e-4 and row["numpy_ms"] > 0 and row["torch_ms"] > 0
