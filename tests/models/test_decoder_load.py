"""Loading decoder folders: sharded and half-precision weights, the tokenizer, encoder folders, and every
kind of bad input as one clear error naming the file or key, raised before any weight is read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mha.models as mm
from mha.models import _checkpoint
from tests.models import hf_zoo

torch = pytest.importorskip("torch")


def _logits(folder, ids):
    with torch.no_grad():
        return hf_zoo.reference(folder)(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_load_as_transformers_upcasts_them(zoo, dtype):
    folder = zoo("qwen2", dtype=dtype)
    header = _checkpoint.read_header(next(folder.glob("*.safetensors")))
    assert {e.code for e in header.values()} == {"BF16" if dtype == "bfloat16" else "F16"}
    ids = np.arange(3, 14)[None]
    want = _logits(folder, ids)
    got = mm.load(folder, backend="numpy").logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_sharded_weights_load_and_a_missing_shard_is_named(zoo, tmp_path):
    import transformers as tr

    src = zoo("llama")
    model = tr.AutoModelForCausalLM.from_pretrained(src)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    ids = np.arange(5, 16)[None]
    np.testing.assert_array_equal(mm.load(folder, backend="numpy").logits(ids),
                                  mm.load(src, backend="numpy").logits(ids))
    shards[1].unlink()
    with pytest.raises(ValueError, match=rf"missing shard '{shards[1].name}'"):
        mm.load(folder)


def test_the_tokenizer_encodes_as_transformers_and_names_its_special_tokens(zoo):
    import transformers as tr

    folder = zoo("llama", text=True)
    model = mm.load(folder, backend="numpy")
    ref = tr.AutoTokenizer.from_pretrained(folder)
    for text in ("The cat sat on the mat.", "Heads copy tokens, élan!"):
        np.testing.assert_array_equal(model.encode_text(text), ref(text).input_ids)
        assert model.decode_text(model.encode_text(text)) == ref.decode(ref(text).input_ids, skip_special_tokens=True)
    assert model.tokenizer.special == {"bos": 1, "eos": 2, "pad": 0}
    assert model.tokenizer.tokens(model.encode_text("The cat"))[:2] == ["<s>", "The"]


def test_encode_gives_causal_attentions_for_the_views(zoo):
    model = mm.load(zoo("mistral", text=True), backend="numpy")
    enc = model.encode("The cat sat on the mat.")
    L = len(enc.tokens)
    assert enc.attentions.shape == (2, 6, L, L) and enc.hidden_states.shape == (L, 48)
    np.testing.assert_allclose(enc.attentions.sum(-1), 1, atol=1e-5)
    assert not np.triu(enc.attentions, 1).any()  # causal
    assert not np.tril(enc.attentions, -5).any()  # Mistral's window of 5


def test_an_encoder_folder_still_gives_the_bert_model(tmp_path):
    from tests.helpers import tiny_bert

    folder = tiny_bert(tmp_path)
    assert isinstance(mm.load(folder, backend="numpy"), mm.BertModel)


def _copy(folder, dest, edit=None, drop=()):
    shutil.copytree(folder, dest)
    for name in drop:
        (dest / name).unlink()
    if edit is not None:
        raw = json.loads((dest / "config.json").read_text())
        edit(raw)
        (dest / "config.json").write_text(json.dumps(raw))
    return dest


BAD_CONFIGS = [
    ("unknown model_type", lambda c: c.update(model_type="mamba"), r"model_type 'mamba' is not supported"),
    ("unknown rope type", lambda c: c["rope_parameters"].update(rope_type="ntk-by-parts"),
     r"rope type 'ntk-by-parts' is not supported"),
    ("rope key of another type", lambda c: c["rope_parameters"].update(beta_fast=4),
     r"rope type 'default' does not take \['beta_fast'\]"),
    ("unknown activation", lambda c: c.update(hidden_act="swiglu"), r"hidden_act='swiglu' is not supported"),
    ("unknown option", lambda c: c.update(attention_chunk_size=64), r"option 'attention_chunk_size' .* not supported"),
    ("quantised", lambda c: c.update(quantization_config={"bits": 4}), r"option 'quantization_config'"),
    ("missing size", lambda c: c.pop("hidden_size"), r"config.json: the config lacks 'hidden_size'"),
    ("wrong type", lambda c: c.update(num_hidden_layers="2"), r"num_hidden_layers='2' in the config; expected an int"),
    ("layer count", lambda c: c.update(num_hidden_layers=3),
     r"config.json declares num_hidden_layers=3 but the weights hold 2 layers \(0-1\); missing keys \['model.layers.2"),
    ("head count", lambda c: c.update(num_key_value_heads=3),
     r"3 key/value heads.*model.layers.0.self_attn.k_proj.weight: expected \(24, 48\), got \(16, 48\)"),
    ("fewer layers", lambda c: c.update(num_hidden_layers=1),
     r"declares num_hidden_layers=1 but the weights hold 2 layers \(0-1\); unexpected keys \['model.layers.1"),
]


@pytest.mark.parametrize("case,edit,message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_is_one_error_naming_the_key(zoo, tmp_path, monkeypatch, case, edit, message):
    folder = _copy(zoo("llama"), tmp_path / "m", edit)
    monkeypatch.setattr(_checkpoint.Checkpoint, "read", lambda *a: pytest.fail("read weights before checking"))
    with pytest.raises(ValueError, match=message):
        mm.load(folder)


def test_missing_files_are_named(zoo, tmp_path):
    src = zoo("gpt2")
    with pytest.raises(ValueError, match=r"/a: no config.json; a model folder holds config.json, the weights"):
        mm.load(_copy(src, tmp_path / "a", drop=["config.json"]))
    with pytest.raises(ValueError, match=r"no model weights: model.safetensors or model.safetensors.index.json"):
        mm.load(_copy(src, tmp_path / "b", drop=["model.safetensors"]))
    with pytest.raises(ValueError, match=r"does not exist"):
        mm.load(tmp_path / "nowhere")
    bad = _copy(src, tmp_path / "c")
    (bad / "model.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"model.safetensors: not a valid safetensors file \(header is not JSON"):
        mm.load(bad)
    odd = _copy(src, tmp_path / "d")
    (odd / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: the model config must be a JSON object"):
        mm.load(odd)


def test_bad_generation_arguments_fail_before_any_work(zoo, monkeypatch):
    model = mm.load(zoo("gpt2"), backend="numpy")
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran before checking"))
    cases = [((np.arange(5), 0), {}, ValueError, r"max_new_tokens must be an int >= 1, got 0"),
             ((np.arange(5), 2.5), {}, TypeError, r"max_new_tokens must be an int"),
             (("some text", 3), {}, ValueError, r"the prompt is text but .* has no tokenizer"),
             ((np.arange(60), 5), {}, ValueError, r"prompt \(60 tokens\) with max_new_tokens=5 spans 65 positions, "
                                                  r"more than the model's max_position_embeddings=64"),
             ((np.array([5, 200]), 3), {}, ValueError, r"prompt holds token id 200, outside the vocabulary \[0, 97\)"),
             ((np.arange(5), 3), {"temperature": -1}, ValueError, r"temperature must be a finite number >= 0"),
             ((np.array([1.0, 2.0]), 3), {}, TypeError, r"prompt must hold integer token ids, got dtype float64"),
             (([], 3), {}, ValueError, r"prompt must be a non-empty \(T,\) or \(B, T\) array of token ids"),
             ((np.arange(5), 3), {"top_p": 1.5}, ValueError, r"top_p must be a number in \(0, 1\]"),
             ((np.arange(5), 3), {"top_k": 0}, ValueError, r"top_k must be an int >= 1"),
             ((np.arange(5), 3), {"keep": 4, "max_cache": 4}, ValueError, r"keep=4 needs a rotating cache larger")]
    for args, kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            model.generate(*args, **kwargs)
    with pytest.raises(ValueError, match=r"spans 70 positions, more than the model's max_position_embeddings=64"):
        model.logits(np.zeros(70, int))


HARMLESS = [("llama", lambda c: c.update(auto_map={"AutoConfig": "configuration_x.XConfig"}, is_llama_config=True,
                                         torch_dtype="bfloat16", use_mrope=False, rope_scaling=None)),
            ("gemma", lambda c: c.update(hidden_activation="gelu")),  # Gemma 1 reads hidden_act; transformers too
            ("phi3", lambda c: c.update(resid_pdrop=0.1, embd_pdrop=0.1, _attn_implementation_autoset=True))]


@pytest.mark.parametrize("name,edit", HARMLESS, ids=[h[0] for h in HARMLESS])
def test_keys_of_real_configs_that_change_nothing_load(zoo, tmp_path, name, edit):
    src = zoo(name)
    folder = _copy(src, tmp_path / "m", edit)
    ids = np.arange(3, 12)
    np.testing.assert_array_equal(mm.load(folder, backend="numpy").logits(ids), mm.load(src, backend="numpy").logits(ids))


def test_loading_and_generating_never_import_torch_or_transformers(zoo):
    import subprocess
    import sys

    folder = zoo("gemma", dtype="bfloat16", text=True)
    code = (f"import sys, mha.models as mm; m = mm.load({str(folder)!r}, backend='numpy'); "
            "m.generate('The cat', 3, attentions=True); "
            "bad = [n for n in ('torch', 'transformers', 'safetensors') if n in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
