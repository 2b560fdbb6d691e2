"""gpt-oss (learned attention sinks, alternating sliding layers, yarn RoPE, a mixture of experts) against
transformers' eager implementation, and the sink mass of every generation step.

transformers' eager attention drops the sink's column, so its weights' rows sum to 1 - the sink's share;
generation reports that share from the layer's log-sum-exp (exp(sink - lse)), independently of the
weights, so "1 - row sum == reported mass" is a check, not an identity."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import mha
import mha.models as mm
from mha.models._decoder import DecoderModel
from tests.conftest import HAS_MLX
from tests.models import hf_zoo

torch = pytest.importorskip("torch")

TOL, ATT_TOL = 1e-4, 1e-5
needs_mlx_sinks = pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed")
CONFIG = dict(vocab_size=97, hidden_size=48, intermediate_size=28, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, num_local_experts=5, num_experts_per_tok=2, sliding_window=4,
              max_position_embeddings=64, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 500.0})
IDS = np.array([[3, 17, 5, 9, 44, 2, 8, 60, 31, 7, 12, 90, 4], [50, 51, 9, 9, 23, 1, 77, 64, 3, 8, 31, 12, 6]])


def build(root, *, init: float = 0.3, sink: float = 3.0, experts: float = 1.0, seed: int = 0):
    """A saved tiny gpt-oss: every weight random (biases, norms and the experts' biases included, which
    transformers initialises to 0 or 1; the experts at std 1, so that the swiglu clamp acts), the sink
    logits ~ N(sink, 1), so that sinks take a real share of rows."""
    import transformers as tr

    cfg = tr.GptOssConfig(**CONFIG, initializer_range=init)
    torch.manual_seed(seed)
    model = tr.GptOssForCausalLM._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(sink + torch.randn_like(p))
            elif name.endswith("bias") or (p.ndim == 1 and "norm" not in name):
                p.copy_(0.5 * init * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1.0 + 0.5 * init * torch.randn_like(p))
            elif "experts" in name:  # std 1: gate/up pre-activations reach past the clamp (7)
                p.copy_(experts * torch.randn_like(p))
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gpt_oss") / "model")


@pytest.fixture(scope="module")
def calm(tmp_path_factory):
    """Smaller experts: attention rows that are not one-hot, for weight parity to 1e-5 (TESTING.md 7)."""
    return build(tmp_path_factory.mktemp("gpt_oss") / "calm", experts=0.3)


def _reference_logits(folder, ids):
    with torch.no_grad():
        return hf_zoo.reference(folder)(torch.tensor(ids)).logits.numpy()


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _switched(model, **changes) -> np.ndarray:
    """Our logits with one feature switched off (config fields replaced, weights dropped or zeroed)."""
    drop = changes.pop("drop", ())
    zero = changes.pop("zero", ())
    w = {k: (np.zeros_like(v) if k.endswith(zero) and zero else v) for k, v in model.canonical_weights().items()
         if not (drop and k.endswith(drop))}
    logits, _, _ = DecoderModel(dataclasses.replace(model.config, **changes), w, backend="numpy").forward(IDS)
    return np.asarray(logits)


def test_logits_match_transformers_and_each_feature_matters(folder):
    want = _reference_logits(folder, IDS)
    model = mm.load(folder, backend="numpy")
    assert model.family == "gpt_oss" and model.config.sinks and model.config.moe == (5, 2, 7.0)
    assert [s.window for s in model.config.layers] == [4, None, 4]
    assert _rel(model.logits(IDS), want) < TOL
    plain = [dataclasses.replace(s, rope=mha.RoPE(dims=s.rope.dims, base=s.rope.base)) for s in model.config.layers]
    guards = {"sinks": dict(sinks=False, drop=".attn.sinks"),
              "window": dict(layers=tuple(dataclasses.replace(s, window=None) for s in model.config.layers)),
              "yarn": dict(layers=tuple(plain)), "top_k": dict(moe=(5, 1, 7.0)), "limit": dict(moe=(5, 2, 1e9)),
              "expert_biases": dict(zero=("gate_up.b", "down.b"))}
    for feature, change in guards.items():
        assert _rel(_switched(model, **change), want) > 100 * TOL, feature


def test_the_v4_config_form_loads_the_same_model(folder, tmp_path):
    v4 = hf_zoo.to_v4(folder, tmp_path / "v4")
    raw = json.loads((v4 / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "yarn" and "rope_parameters" not in raw
    a, b = mm.load(folder, backend="numpy"), mm.load(v4, backend="numpy")
    assert a.config == b.config
    np.testing.assert_array_equal(a.logits(IDS), b.logits(IDS))


def _check_generation(folder, backend: str):
    prompt, n = IDS[0, :9], 6
    with torch.no_grad():
        ref = hf_zoo.reference(folder).generate(torch.tensor(prompt)[None], max_new_tokens=n, do_sample=False,
                                                 output_attentions=True, return_dict_in_generate=True,
                                                 eos_token_id=None, pad_token_id=0)
    out = mm.load(folder, backend=backend).generate(prompt, n, attentions=True, stop_at_eos=False)
    np.testing.assert_array_equal(out.ids, ref.sequences.numpy()[0])
    assert out.sink_mass.shape == (n, 3, 6)
    for s, (att, mass, theirs) in enumerate(zip(out.attentions, out.sink_mass, ref.attentions)):
        rows = att[:, :, -1]  # (layers, H, P + s): the step's last query
        np.testing.assert_allclose(1 - rows.sum(-1), mass, rtol=0, atol=1e-6, err_msg=f"step {s}")
        hf = np.stack([1 - t.numpy()[0, :, -1].sum(-1) for t in theirs])  # transformers drops the sink column
        np.testing.assert_allclose(mass, hf, rtol=0, atol=ATT_TOL, err_msg=f"step {s}")
        for layer, t in enumerate(theirs):
            S = t.shape[-1]
            np.testing.assert_allclose(att[layer][..., -S:], t.numpy()[0], rtol=0, atol=ATT_TOL)
    assert out.sink_mass.max() > 0.5 and (out.sink_mass > 0.05).mean() > 0.5  # sinks that matter


def test_generation_ids_attentions_and_sink_mass_match_transformers(calm):
    _check_generation(calm, "numpy")


@needs_mlx_sinks
def test_gpt_oss_on_mlx(folder, calm):
    assert _rel(mm.load(folder, backend="mlx").logits(IDS), _reference_logits(folder, IDS)) < TOL
    _check_generation(calm, "mlx")


def test_without_sinks_the_reported_mass_is_zero_and_rows_sum_to_one(zoo):
    out = mm.load(zoo("qwen2", init=0.25), backend="numpy").generate(IDS[0, :6], 3, attentions=True)
    assert not out.sink_mass.any()
    for att in out.attentions:
        np.testing.assert_allclose(att[:, :, -1].sum(-1), 1, atol=1e-6)


def test_pruned_gpt_oss_keeps_its_sinks_and_loads_in_transformers(folder, tmp_path):
    model = mm.load(folder, backend="numpy")
    spec = {0: [1, 4], 1: [0, 5], 2: [2, 3]}
    pruned = model.prune_heads(spec)
    assert pruned.num_heads == 4 and pruned.layers[0].weights.sinks.tolist() == \
        model.layers[0].weights.sinks[[0, 2, 3, 5]].tolist()
    pruned.save(tmp_path / "p")
    want = model.logits(IDS, head_mask=spec)
    assert _rel(_reference_logits(tmp_path / "p", IDS), want) < 1e-5


def test_the_sink_role(folder):
    """Heads of a model with sinks get the "sink" role when the sink takes most of their rows."""
    import mha.analysis as ma

    table = ma.decoder_roles(mm.load(folder, backend="numpy"), sequences=6, length=10)
    assert "sink" in table.roles
    top = table.ranking("sink")[0]
    assert top.role == "sink" and top.score > 0.5 and top.chances["sink"] < 0.15


@pytest.mark.parametrize("change, match", [
    ({"quantization_config": {"quant_method": "mxfp4"}}, "quantized experts .*'mxfp4'.* dequantize first"),
    ({"experts_per_token": 3}, "experts_per_token=3 .* the same as num_experts_per_tok=2"),
    ({"rope_parameters": None}, "neither rope_parameters nor rope_scaling"),
    ({"num_experts_per_tok": 9}, "at most num_local_experts=5"),
])
def test_bad_configs_are_refused(folder, tmp_path, change, match):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        mm.load(tmp_path, backend="numpy")


def test_the_step_view_shows_each_steps_sink_mass(calm, tmp_path):
    import mha.viz as mv
    from tests.helpers import browser_page

    out = mm.load(calm, backend="numpy").generate(IDS[0, :9], 4, attentions=True, stop_at_eos=False)
    page = mv.step_report(out)
    data = json.loads(page.html.split('id="data">')[1].split("</script>")[0])
    np.testing.assert_allclose(data["sink_mass"], out.sink_mass, rtol=0, atol=1e-4)
    page.save(tmp_path / "steps.html")
    with browser_page((tmp_path / "steps.html").as_uri()) as tab:
        tab.click("#next")  # step 1
        tab.select_option("#layer", "2")
        text = tab.locator("#sinks").text_content()
    assert text.startswith("sink mass at step 1, layer 2: head 0 ")
    shown = [float(part.split()[-1]) for part in text.split(": ", 1)[1].split(", ")]
    np.testing.assert_allclose(shown, out.sink_mass[1, 2], rtol=0, atol=1e-3)
