"""Ablation and GQA-aware pruning of decoders (mha.models._heads, _save): a pruned folder loads in
transformers and equals the original with those heads masked; ablated generation equals pruned
generation; bad requests are refused before any work."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import mha.models as mm
from tests.models import hf_zoo

IDS = np.array([3, 17, 5, 9, 44, 2, 8, 60, 31, 7, 12])
# H 6, Hkv 2 (groups: heads 0-2 and 3-5): one head from each group in both layers; a whole group from
# each layer; one layer only (the other keeps every head: padded with dead heads to one shape)
SPECS = [({0: [0, 3], 1: [2, 5]}, (4, 2), {}),
         ({0: [3, 4, 5], 1: [0, 1, 2]}, (3, 1), {}),
         ({0: [1, 4]}, (6, 2), {0: [2, 5]})]


def _close(got, want, tol=1e-5):
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


def _hf_logits(folder, ids):
    import torch

    with torch.no_grad():
        return hf_zoo.reference(folder)(torch.tensor(ids[None])).logits[0].numpy()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_pruned_folder_loads_in_transformers_and_equals_the_masked_model(zoo, tmp_path, name):
    model = mm.load(zoo(name, init=0.5), backend="numpy")
    for k, (spec, shape, dead) in enumerate(SPECS):
        masked = model.logits(IDS, head_mask=spec)
        assert np.abs(masked - model.logits(IDS)).max() > 0.1 * np.abs(masked).max()  # the mask matters
        pruned = model.prune_heads(spec)
        assert (pruned.num_heads, pruned.num_kv_heads) == shape and pruned.dead_heads == dead
        _close(pruned.logits(IDS), masked)
        out = tmp_path / f"pruned{k}"
        pruned.save(out)
        config = json.loads((out / "config.json").read_text())
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (*shape, 8)
        _close(_hf_logits(out, IDS), masked)
        ablated = model.generate(IDS, 6, head_mask=spec, stop_at_eos=False)
        np.testing.assert_array_equal(ablated.ids, pruned.generate(IDS, 6, stop_at_eos=False).ids)
        assert not np.array_equal(ablated.ids, model.generate(IDS, 6, stop_at_eos=False).ids) or k == 2


def test_a_pruned_config_without_head_dim_is_what_transformers_gets_wrong(zoo, tmp_path):
    """The trap: without head_dim, Llama derives hidden_size / num_attention_heads = 48 / 4 = 12, not 8,
    and the saved tensors no longer fit; our config states it."""
    pruned = mm.load(zoo("llama", init=0.5), backend="numpy").prune_heads(SPECS[0][0])
    pruned.save(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    del config["head_dim"]
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _hf_logits(tmp_path / "p", IDS)


def test_a_kv_group_ablation_removes_the_group(zoo):
    model = mm.load(zoo("qwen2", init=0.5), backend="numpy")
    group = model.group_heads(1)
    assert group == [3, 4, 5]
    pruned = model.prune_heads({1: group})  # layer 0 keeps both groups: layer 1 is padded to its shape ...
    assert (pruned.num_heads, pruned.num_kv_heads) == (6, 2) and pruned.head_map[0] == list(range(6))
    assert pruned.head_map[1] == [0, 1, 2, None, None, None] and pruned.dead_heads == {1: [3, 4, 5]}
    pruned = model.prune_heads({0: group, 1: model.group_heads(0)})  # ... one group from each layer
    assert (pruned.num_heads, pruned.num_kv_heads) == (3, 1)
    assert pruned.head_map == {0: [0, 1, 2], 1: [3, 4, 5]}
    _close(pruned.logits(IDS), model.logits(IDS, head_mask={0: group, 1: [0, 1, 2]}))


def test_ablation_is_the_heads_context_before_o_proj(zoo):
    """Masking a head equals deleting its o_proj columns by hand (never a slice of o_proj's output)."""
    model = mm.load(zoo("llama", init=0.5), backend="numpy")
    w = model.canonical_weights()
    w["1.attn.o.w"][:, 2 * 8:3 * 8] = 0  # head 2 of layer 1: D = 8 columns
    by_hand = mm.DecoderModel(model.config, w, backend="numpy")
    _close(model.logits(IDS, head_mask={1: [2]}), by_hand.logits(IDS), 1e-6)


@pytest.mark.parametrize("spec, error, match", [
    ({0: [0]}, ValueError, r"group 0 \(heads 0-2\) keeps 2, group 1 \(heads 3-5\) keeps 3"),
    ({0: [6]}, ValueError, "head 6 is out of range; each layer has 6 query heads, 0 to 5"),
    ({2: [0]}, ValueError, "layer 2 is out of range; the model has 2 layers"),
    ({0: list(range(6))}, ValueError, "cannot prune all 6 query heads of layer 0"),
    ({0: []}, ValueError, "names no head to prune"),
    ({0: [1.0]}, TypeError, "head indices"),
    ([0, 1], TypeError, "must be a dict"),
])
def test_bad_pruning_requests_are_refused(zoo, spec, error, match):
    model = mm.load(zoo("llama", init=0.5), backend="numpy")
    with pytest.raises(error, match=match):
        model.prune_heads(spec)


def test_bad_head_masks_are_refused_before_any_work(zoo):
    model = mm.load(zoo("llama", init=0.5), backend="numpy")
    with pytest.raises(ValueError, match=r"head_mask\[0\]: head 7 is out of range"):
        model.generate(IDS, 3, head_mask={0: [7]})
    with pytest.raises(TypeError, match="head_mask must be a dict"):
        model.logits(IDS, head_mask=[0])


def test_save_refuses_what_it_cannot_write(zoo, tmp_path):
    model = mm.load(zoo("llama", init=0.5), backend="numpy").prune_heads({0: [0, 3], 1: [0, 3]})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    (tmp_path / "file").write_text("keep me")
    for where, match in ((tmp_path / "full", "not empty"), (tmp_path / "file", "is a file"),
                         (tmp_path / "missing" / "m", "does not exist")):
        with pytest.raises(ValueError, match=match):
            model.save(where)
    assert (tmp_path / "full" / "x").read_text() == "keep me" and (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    model.save(tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", "generation_config.json",
                                                                      "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _as_nobody(fn) -> str:
    """``fn()`` in a forked child that drops root's rights (user nobody) when the tests run as root, else
    here; what it raised, as "Type: message" ("" for nothing)."""
    if os.geteuid() != 0:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - reported to the caller
            return f"{type(err).__name__}: {err}"
        return ""
    import warnings

    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads alive: the child only checks a path
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        msg = b""
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
        except BaseException as err:  # noqa: BLE001
            msg = f"{type(err).__name__}: {err}".encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    out = os.read(r, 1 << 16).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return out


def test_an_unwritable_output_folder_is_refused_before_any_work():
    import shutil
    import tempfile

    from mha.models._save import check_folder

    shared = tempfile.mkdtemp(prefix="mha-heads-")  # a folder user nobody may enter (tmp_path is root's own)
    os.chmod(shared, 0o755)
    ro, closed = os.path.join(shared, "ro"), os.path.join(shared, "closed")
    os.mkdir(ro, 0o555)
    os.mkdir(closed, 0o000)
    try:
        got = _as_nobody(lambda: check_folder(os.path.join(ro, "m")))
        assert got == f"ValueError: cannot write the model to '{ro}/m': the folder '{ro}' is not writable", got
        assert _as_nobody(lambda: check_folder(ro)).endswith(f"'{ro}': the folder is not writable")
        got = _as_nobody(lambda: check_folder(os.path.join(closed, "m")))  # not even searchable: no OSError
        assert got.startswith("ValueError: cannot write the model to") and "ermission denied" in got, got
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_gpt2_keeps_its_head_count_or_is_not_saved(zoo, tmp_path):
    """GPT-2's config has no head_dim: a head pruned from one layer only is saved as a dead head (the shape
    unchanged, transformers equal to the masked model); fewer heads in every layer is refused."""
    model = mm.load(zoo("gpt2", init=0.5), backend="numpy")
    padded = model.prune_heads({0: [1]})
    assert padded.num_heads == 6 and padded.dead_heads == {0: [5]}
    padded.save(tmp_path / "padded")
    _close(_hf_logits(tmp_path / "padded", IDS), model.logits(IDS, head_mask={0: [1]}))
    pruned = model.prune_heads({0: [1], 1: [4]})
    _close(pruned.logits(IDS), model.logits(IDS, head_mask={0: [1], 1: [4]}))
    with pytest.raises(ValueError, match="pruned GPT-2 cannot be saved"):
        pruned.save(tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_mha_prune_heads_writes_a_folder(zoo, tmp_path):
    from cli.main import cli

    folder = zoo("qwen2", init=0.5)
    run = lambda *args: CliRunner().invoke(cli, ["prune", "--model", str(folder), *args])  # noqa: E731
    res = run("--heads", "0:0,3", "--heads", "1:1,4", "-o", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert "query heads 6 -> 4" in res.stdout and (tmp_path / "out" / "model.safetensors").is_file()
    want = mm.load(folder, backend="numpy").logits(IDS, head_mask={0: [0, 3], 1: [1, 4]})
    _close(_hf_logits(tmp_path / "out", IDS), want)
    res = run("--kv-heads", "0:1", "--kv-heads", "1:0", "-o", str(tmp_path / "kv"), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["num_kv_heads"] == [2, 1]
    for args, match in ((("--heads", "0:0", "-o", str(tmp_path / "a")), "breaks grouped-query attention"),
                        (("--heads", "0:9", "-o", str(tmp_path / "a")), "head 9 is out of range"),
                        (("--heads", "0:", "-o", str(tmp_path / "a")), "names no index"),
                        (("--heads", "x:1", "-o", str(tmp_path / "a")), "is not LAYER:INDEX"),
                        (("--kv-heads", "0:2", "-o", str(tmp_path / "a")), "key/value head 2 is out of range"),
                        (("--heads", "0:0,3", "-o", str(tmp_path / "out")), "not empty"),
                        (("--heads", "0:0,3", "-o", str(tmp_path / "no" / "a")), "does not exist"),
                        (("--heads", "0:0,3"), "give the output folder"),
                        (("-o", str(tmp_path / "a")), "is a decoder (model_type 'qwen2') and no head to prune")):
        res = run(*args)
        assert res.exit_code == 2 and match in res.output and "Traceback" not in res.output, (args, res.output)
    assert not (tmp_path / "a").exists()
    res = CliRunner().invoke(cli, ["prune", "--model", str(tmp_path), "--heads", "0:1", "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "config.json" in res.output


def test_ablation_and_pruning_on_mlx(zoo):
    pytest.importorskip("mlx.core")
    folder, spec = zoo("llama", init=0.5), {0: [1, 4], 1: [0, 3]}
    model, ref = mm.load(folder, backend="mlx"), mm.load(folder, backend="numpy")
    _close(model.logits(IDS, head_mask=spec), ref.logits(IDS, head_mask=spec))
    pruned = model.prune_heads(spec)
    assert pruned.backend == "mlx"
    ablated = model.generate(IDS, 4, head_mask=spec, stop_at_eos=False).ids
    np.testing.assert_array_equal(ablated, pruned.generate(IDS, 4, stop_at_eos=False).ids)
    np.testing.assert_array_equal(ablated, ref.generate(IDS, 4, head_mask=spec, stop_at_eos=False).ids)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in hf_zoo.ZOO if hf_zoo.FAMILY[n] != "gpt2" and n != "phi3-longrope"])
def test_every_family_saves_a_pruned_folder_transformers_loads(zoo, tmp_path, name):
    """Every llama-like family (fused Phi-3 tensors, Gemma's 1 + w norms, q/k norms, sliding layers, RoPE
    scalings): one query head from each group of both layers, saved; transformers' logits equal the masked
    model's within the families' parity tolerance (1e-4: RoPE scalings alone differ by more than 1e-5)."""
    model = mm.load(zoo(name, init=0.5), backend="numpy")
    spec = {0: [0, 3], 1: [1, 4]}
    model.prune_heads(spec).save(tmp_path / "p")
    ids = IDS[:8] if model.max_length < 11 else IDS
    _close(_hf_logits(tmp_path / "p", ids), model.logits(ids, head_mask=spec), 1e-4)


def test_a_pruned_longrope_phi3_is_refused(zoo, tmp_path):
    pruned = mm.load(zoo("phi3-longrope", init=0.5), backend="numpy").prune_heads({0: [0, 3], 1: [1, 4]})
    with pytest.raises(ValueError, match="LongRoPE and 4 heads cannot be saved"):
        pruned.save(tmp_path / "p")
