"""Decoder checkpoints against transformers (eager attention, float32): logits, both config forms, greedy
generation and the attention of every generated token, with a guard per family feature showing that
a loader ignoring it would fail."""

from __future__ import annotations

import numpy as np
import pytest

import mha.models as mm
from mha.models._decoder import DecoderModel
from tests.conftest import HAS_MLX
from tests.models import hf_zoo

torch = pytest.importorskip("torch")

TOL = 1e-4  # logits: max |ours - transformers| / max |transformers|
ATT_TOL = 1e-5  # attention weights: absolute
NAMES = list(hf_zoo.ZOO)


needs_mlx = pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed")


def _ids(T: int = 20, B: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 97, (B, T))


def _reference_logits(folder, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_zoo.reference(folder)(torch.tensor(ids)).logits.numpy()


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _ours_with(model, off, ids) -> np.ndarray:
    """Our logits with one feature switched off (the length check bypassed: dynamic RoPE off has a shorter
    limit)."""
    config, weights = off(model.config, model.canonical_weights())
    logits, _, _ = DecoderModel(config, weights, backend="numpy").forward(ids)
    return np.asarray(logits)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_and_each_feature_matters(zoo, name):
    folder = zoo(name)
    ids = _ids()
    want = _reference_logits(folder, ids)
    model = mm.load(folder, backend="numpy")
    assert model.family == hf_zoo.FAMILY[name]
    assert _rel(model.logits(ids), want) < TOL
    assert _rel(model.logits(ids[1]), want[1]) < TOL  # unbatched
    for feature, off in hf_zoo.ZOO[name][3].items():  # the guard: this feature ignored fails by far
        assert _rel(_ours_with(model, off, ids), want) > 100 * TOL, feature


@pytest.mark.parametrize("name", NAMES)
def test_the_v4_config_form_loads_the_same_model(zoo, name):
    v5, v4 = zoo(name), zoo(name, v4=True)
    a, b = mm.load(v5, backend="numpy"), mm.load(v4, backend="numpy")
    assert a.config == b.config
    ids = _ids(T=15, B=1)
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    assert _rel(_reference_logits(v4, ids), _reference_logits(v5, ids)) < 1e-6  # transformers reads it alike


def _reference_generation(folder, ids, n):
    with torch.no_grad():
        return hf_zoo.reference(folder).generate(torch.tensor(ids)[None], max_new_tokens=n, do_sample=False,
                                                  output_attentions=True, return_dict_in_generate=True,
                                                  eos_token_id=None, pad_token_id=0)


def _check_attentions(ours: list, theirs) -> None:
    """Each step, each layer: ours (layers, H, T, P + s) at absolute positions equals transformers' (H, T, S)
    on its last S keys (a sliding cache holds only those) and is 0 before them."""
    assert len(ours) == len(theirs)
    for s, (mine, step) in enumerate(zip(ours, theirs)):
        assert mine.shape[-1] == ours[0].shape[-1] + s and mine.shape[2] == (ours[0].shape[2] if s == 0 else 1)
        for layer, t in enumerate(step):
            t = t.numpy()[0]
            S = t.shape[-1]
            np.testing.assert_allclose(mine[layer][..., -S:], t, rtol=0, atol=ATT_TOL, err_msg=f"step {s}")
            assert not mine[layer][..., :-S].any()


def _check_generation(zoo, name, backend):
    folder = zoo(name, init=0.25)  # attention parity to 1e-5 needs rows that are not one-hot (TESTING.md 7)
    prompt, n = _ids(T=9, B=1, seed=2)[0], 8
    ref = _reference_generation(folder, prompt, n)
    out = mm.load(folder, backend=backend).generate(prompt, n, attentions=True, stop_at_eos=False)
    np.testing.assert_array_equal(out.ids, ref.sequences.numpy()[0])
    np.testing.assert_array_equal(out.new_ids, out.ids[9:])
    _check_attentions(out.attentions, ref.attentions)


def test_longrope_generation_follows_the_full_forward(zoo, backend):
    """Phi-3's LongRoPE switches to the long factors past original_max_position_embeddings (12 here): each
    greedy token equals the argmax of transformers' full forward over the sequence so far (transformers'
    own generate loses the context at the switch in 5.18: its Phi-3 drops the cache and feeds one token)."""
    folder = zoo("phi3-longrope", init=0.25)
    prompt = _ids(T=9, B=1, seed=2)[0]
    out = mm.load(folder, backend=backend).generate(prompt, 8, attentions=True, stop_at_eos=False)
    ref = hf_zoo.reference(folder)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
    np.testing.assert_array_equal(out.ids, seq)
    full = ref(torch.tensor([seq[:-1]]), output_attentions=True).attentions
    last = np.stack([a.detach().numpy()[0, :, -1:] for a in full])  # the last step's row, from one pass
    np.testing.assert_allclose(out.attentions[-1], last, rtol=0, atol=ATT_TOL)


@needs_mlx
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("v4", [False, True], ids=["v5", "v4"])
def test_logits_match_transformers_on_mlx(zoo, name, v4):
    folder = zoo(name, v4=v4)
    ids = _ids(T=20)
    assert _rel(mm.load(folder, backend="mlx").logits(ids), _reference_logits(folder, ids)) < TOL


@pytest.mark.parametrize("name", [n for n in NAMES if n != "phi3-longrope"])
def test_greedy_generation_and_its_attentions_match_transformers(zoo, name):
    _check_generation(zoo, name, "numpy")


@needs_mlx
@pytest.mark.parametrize("name", [n for n in NAMES if n != "phi3-longrope"])
def test_greedy_generation_and_its_attentions_match_transformers_on_mlx(zoo, name):
    _check_generation(zoo, name, "mlx")
