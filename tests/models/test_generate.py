"""Generation on our own terms: left-padded batches, EOS, sampling, streaming, the cache, and the
project's attention-only family against an independent implementation of its definition (seam.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import mha.models as mm
from mha import _io
from mha.models._generate import pick


def _full_forward_greedy(model, prompt, n):
    """Greedy ids by a full forward over the sequence at every step (no cache): what the cache must give."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.logits(np.array(seq))[-1].argmax()))
    return np.array(seq)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_left_padded_batch_generates_what_each_prompt_does_alone(zoo, name, backend):
    folder = zoo(name, init=0.25)
    model = mm.load(folder, backend=backend)
    exact = mm.load(folder, backend="numpy", dtype="float64")  # the same weights, float64: the rounding's yardstick
    short, long = np.arange(10, 15), np.arange(20, 31)
    out = model.generate([short, long], 6, attentions=True, stop_at_eos=False)
    assert out.ids.shape == (2, 17) and out.mask.sum(1).tolist() == [11, 17]
    for row, prompt in enumerate((short, long)):
        alone = model.generate(prompt, 6, attentions=True, stop_at_eos=False)
        alone64 = exact.generate(prompt, 6, attentions=True, stop_at_eos=False)
        np.testing.assert_array_equal(out.new_ids[row], alone.new_ids)
        np.testing.assert_array_equal(alone.ids, _full_forward_greedy(model, prompt, 6))
        np.testing.assert_array_equal(alone64.ids, alone.ids)
        pad = 11 - len(prompt)  # the row's left padding
        for s, (b, a, a64) in enumerate(zip(out.attentions, alone.attentions, alone64.attentions)):
            rows = slice(pad, None) if s == 0 else slice(None)
            padded = b[row][:, :, rows, pad:].astype(np.float64)
            # The padded row's weights are as accurate as the row's alone: within twice the float32 rounding
            # error the row alone shows against float64 (left padding changes the RoPE angles' and the
            # products' rounding, nothing else); a padding bug moves weights by orders of magnitude more.
            rounding = np.abs(a - a64).max()
            assert np.abs(padded - a64).max() <= 2 * rounding + 2 * np.finfo(np.float32).eps, (s, rounding)
            assert not b[row][:, :, rows, :pad].any()  # padding is never attended


def test_logits_of_a_padded_row_equal_its_tokens_alone(zoo):
    model = mm.load(zoo("gpt2"), backend="numpy")
    ids = np.array([[0, 0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7]])
    mask = np.array([[False] * 3 + [True] * 4, [True] * 7])
    got = model.logits(ids, key_mask=mask)
    want = model.logits(ids[0, 3:])
    assert np.abs(got[0, 3:] - want).max() <= 1e-5 * np.abs(want).max()


def test_generation_stops_at_eos_per_row(zoo):
    model = mm.load(zoo("qwen2"), backend="numpy")
    prompts = [np.arange(3, 9), np.arange(40, 52)]
    free = model.generate(prompts, 6, stop_at_eos=False)
    eos = int(free.new_ids[0, 2])  # make row 0's third token its EOS
    assert eos not in free.new_ids[1, :2]
    model.config = __import__("dataclasses").replace(model.config, eos_token_ids=(eos,), pad_token_id=0)
    out = model.generate(prompts, 6)
    assert out.finished[0] and out.new_ids[0, 2] == eos and (out.new_ids[0, 3:] == 0).all()
    np.testing.assert_array_equal(out.new_ids[1], free.new_ids[1][:out.new_ids.shape[1]])
    single = model.generate(prompts[0], 6)
    assert single.new_ids.tolist() == free.new_ids[0, :3].tolist() and single.finished.all()


def test_the_cache_is_allocated_once_for_prompt_and_new_tokens(zoo, monkeypatch):
    model = mm.load(zoo("mistral"), backend="numpy")
    asked = []
    for layer in model.layers:
        orig = layer.init_cache
        monkeypatch.setattr(layer, "init_cache", lambda B, n=None, _o=orig, **kw: asked.append(n) or _o(B, n, **kw))
    out = model.generate(np.arange(3, 12), 7, stop_at_eos=False)
    assert asked == [16, 16]
    np.testing.assert_array_equal(out.ids, _full_forward_greedy(model, np.arange(3, 12), 7))


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_last_only_runs_the_last_layers_mlp_on_the_last_row_and_keeps_the_logits(zoo, name, monkeypatch):
    model = mm.load(zoo(name, init=0.25), backend="numpy")
    ids = np.arange(3, 20)[None]
    full, _, _ = model.forward(ids)
    rows = []
    orig = model._mlp
    monkeypatch.setattr(model, "_mlp", lambda x, *a: rows.append(x.shape[1]) or orig(x, *a))
    last, _, hidden = model.forward(ids, caches=[layer.init_cache(1, 17) for layer in model.layers], last_only=True)
    assert rows == [17] * (model.num_layers - 1) + [1]  # the prefill of generate: the last MLP on one row
    assert last.shape == (1, 1, model.vocab_size) and hidden.shape == (1, 1, model.config.hidden_size)
    np.testing.assert_allclose(last[0, 0], full[0, -1], rtol=0, atol=1e-5 * np.abs(full[0, -1]).max())


def test_streaming_calls_back_with_each_new_token(zoo):
    model = mm.load(zoo("gemma"), backend="numpy")
    seen = []
    out = model.generate(np.arange(5, 10), 4, stop_at_eos=False, attentions=True,
                         on_token=lambda s, ids, att: seen.append((s, ids.tolist(), att)))
    assert [x[:2] for x in seen] == [(s, [int(t)]) for s, t in enumerate(out.new_ids)]
    for s, (_, _, att) in enumerate(seen):
        np.testing.assert_array_equal(att[0], out.attentions[s])


def test_text_prompts_give_text(zoo):
    model = mm.load(zoo("llama", text=True), backend="numpy")
    out = model.generate("The cat", 5, stop_at_eos=False, attentions=True)
    assert out.text == model.decode_text(out.new_ids)
    assert out.tokens[:3] == ["<s>", "The", " cat"] and len(out.tokens) == len(out.ids)
    batch = model.generate(["The cat", "A dog ran after the"], 3, stop_at_eos=False)
    assert isinstance(batch.text, list) and len(batch.text) == 2
    assert out.sink_mass.shape == (5, 2, 6) and not out.sink_mass.any()
    for s, a in enumerate(out.attentions):
        np.testing.assert_allclose(a.sum(-1), 1, atol=1e-5)


def test_sampling_is_seeded_and_top_k_1_is_greedy(zoo):
    model = mm.load(zoo("phi3", init=0.25), backend="numpy")
    prompt = np.arange(4, 11)
    a = model.generate(prompt, 8, temperature=1.3, seed=5, stop_at_eos=False)
    b = model.generate(prompt, 8, temperature=1.3, seed=5, stop_at_eos=False)
    c = model.generate(prompt, 8, temperature=1.3, seed=6, stop_at_eos=False)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, c.ids)
    greedy = model.generate(prompt, 8, stop_at_eos=False)
    np.testing.assert_array_equal(model.generate(prompt, 8, temperature=2.0, top_k=1, seed=1, stop_at_eos=False).ids,
                                  greedy.ids)


def test_pick_draws_from_the_tempered_truncated_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    rng = np.random.default_rng(0)
    n = 20000

    def freq(**kw):
        draws = np.array([pick(logits, rng=rng, **kw)[0] for _ in range(n)])
        return np.bincount(draws, minlength=4) / n

    def close(f, p):
        sd = np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)
        assert (np.abs(f - p) <= 5 * sd + 1e-12).all(), (f, p)

    close(freq(temperature=1.0, top_k=None, top_p=None), np.array([0.5, 0.3, 0.15, 0.05]))
    t = np.array([0.5, 0.3, 0.15, 0.05]) ** (1 / 2.0)
    close(freq(temperature=2.0, top_k=None, top_p=None), t / t.sum())
    close(freq(temperature=1.0, top_k=2, top_p=None), np.array([0.625, 0.375, 0, 0]))
    close(freq(temperature=1.0, top_k=None, top_p=0.7), np.array([0.625, 0.375, 0, 0]))  # 0.5 + 0.3 reach 0.7
    close(freq(temperature=1.0, top_k=None, top_p=0.85), np.array([0.5, 0.3, 0.15, 0]) / 0.95)
    assert pick(logits, 0.0, None, None, rng).tolist() == [0]


# -- mha_attn_only: the project's own family (seam.md) ----------------------------------------------------------

def _attn_only_folder(tmp_path, positions: str, bias: bool, tie: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    V, E, L, H, Hkv, D, P = 23, 12, 2, 4, 2, 6, 40
    w = {"embed_tokens.weight": rng.normal(size=(V, E))}
    if positions == "learned":
        w["embed_positions.weight"] = rng.normal(size=(P, E))
    if not tie:
        w["lm_head.weight"] = rng.normal(size=(V, E))
    for i in range(L):
        for n, shape in (("q", (H * D, E)), ("k", (Hkv * D, E)), ("v", (Hkv * D, E)), ("o", (E, H * D))):
            w[f"layers.{i}.self_attn.{n}_proj.weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
            if bias:
                w[f"layers.{i}.self_attn.{n}_proj.bias"] = 0.5 * rng.normal(size=shape[0])
    cfg = {"model_type": "mha_attn_only", "vocab_size": V, "hidden_size": E, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": D, "max_position_embeddings": P,
           "attention_bias": bias, "positions": positions, "tie_word_embeddings": tie}
    if positions == "rope":
        cfg["rope_theta"] = 100.0
    folder = tmp_path / f"{positions}-{bias}-{tie}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    _io.save_safetensors(folder / "model.safetensors", {k: v.astype(np.float32) for k, v in w.items()})
    return folder, {k: v.astype(np.float64) for k, v in w.items()}, cfg


def _attn_only_reference(w, cfg, ids):
    """seam.md's forward in float64, one head at a time: x = E[ids] (+ P[pos]); x += attn_i(x) (causal,
    RoPE split-half on q and k when positions = rope); logits = x W_U^T."""
    T, H, Hkv, D = len(ids), cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    x = w["embed_tokens.weight"][ids]
    if cfg["positions"] == "learned":
        x = x + w["embed_positions.weight"][:T]

    def rot(a):  # (T, D) at positions 0..T-1
        half = D // 2
        ang = np.arange(T)[:, None] * cfg.get("rope_theta", 1.0) ** (-np.arange(half) * 2 / D)[None]
        c, s = np.cos(ang), np.sin(ang)
        return np.concatenate([a[:, :half] * c - a[:, half:] * s, a[:, :half] * s + a[:, half:] * c], axis=1)

    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}.self_attn."
        proj = {n: x @ w[p + f"{n}_proj.weight"].T + w.get(p + f"{n}_proj.bias", 0) for n in "qkv"}
        heads = []
        for h in range(H):
            g = h // (H // Hkv)
            q, k, v = proj["q"][:, h * D:(h + 1) * D], proj["k"][:, g * D:(g + 1) * D], proj["v"][:, g * D:(g + 1) * D]
            if cfg["positions"] == "rope":
                q, k = rot(q), rot(k)
            s = q @ k.T / math.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
            a = np.exp(s - s.max(1, keepdims=True))
            heads.append((a / a.sum(1, keepdims=True)) @ v)
        x = x + np.concatenate(heads, 1) @ w[p + "o_proj.weight"].T + w.get(p + "o_proj.bias", 0)
    return x @ (w["embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]).T


@pytest.mark.parametrize("positions,bias,tie", [("learned", False, False), ("rope", True, True)])
def test_attention_only_family_is_the_seam_definition(tmp_path, positions, bias, tie, backend):
    folder, w, cfg = _attn_only_folder(tmp_path, positions, bias, tie)
    model = mm.load(folder, backend=backend)
    assert (model.family, model.num_layers, model.num_heads, model.num_kv_heads) == ("mha_attn_only", 2, 4, 2)
    ids = np.array([3, 9, 1, 22, 3, 9, 1, 5, 0, 17, 11])
    want = _attn_only_reference(w, cfg, ids)
    got = model.logits(ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    out = model.generate(ids[:6], 5, attentions=True)
    np.testing.assert_array_equal(out.ids, _full_forward_greedy(model, ids[:6], 5))
    assert out.attentions[0].shape == (2, 4, 6, 6) and out.attentions[4].shape == (2, 4, 1, 10)
    enc = model.encode("3 9 1 22 3 9")  # no tokenizer: ids as text
    assert model.tokenizer is None and enc.tokens == ["t3", "t9", "t1", "t22", "t3", "t9"]
    np.testing.assert_allclose(enc.attentions, out.attentions[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"has no tokenizer: give token ids separated by spaces"):
        model.encode("the cat")


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_canonical_weights_round_trip_and_to_another_backend(zoo, name, backend):
    model = mm.load(zoo(name), backend="numpy")
    w = model.canonical_weights()
    again = mm.DecoderModel(model.config, w, backend="numpy").canonical_weights()
    from mha.models._layouts import layout

    assert set(w) == {t for src in layout(model.config).values() for t, _ in src.targets}
    assert w.keys() == again.keys() and all(np.array_equal(w[k], again[k]) for k in w)
    ids = np.arange(4, 17)
    other = model.to(backend)
    assert other.backend == backend
    assert np.abs(other.logits(ids) - model.logits(ids)).max() <= 1e-5 * np.abs(model.logits(ids)).max()


# -- rotating caches ----------------------------------------------------------------------------------------------

def test_a_rotating_cache_of_W_is_a_sliding_window_of_W(zoo, backend):
    """max_cache=W on a model without windows = the same weights with a window of W on every layer, in ids and
    in every step's weights (the prompt, longer than W, included)."""
    import dataclasses

    model = mm.load(zoo("phi3", init=0.25), backend=backend)
    W = 5
    windowed = mm.DecoderModel(dataclasses.replace(model.config, layers=tuple(
        dataclasses.replace(s, window=W) for s in model.config.layers)), model.canonical_weights(), backend=backend)
    prompt = np.arange(3, 12)
    rotating = model.generate(prompt, 6, attentions=True, stop_at_eos=False, max_cache=W)
    sliding = windowed.generate(prompt, 6, attentions=True, stop_at_eos=False)
    np.testing.assert_array_equal(rotating.ids, sliding.ids)
    for a, b in zip(rotating.attentions, sliding.attentions):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert not np.array_equal(rotating.ids, model.generate(prompt, 6, stop_at_eos=False).ids)  # W matters here


def _masked_greedy(model, prompt, n, W, k):
    """Greedy ids by a full forward per step in which query i sees keys j <= i with j < k or j > i - (W - k)
    (StreamingLLM: k sinks and the last W - k positions), through each layer's ``mask=``: no cache at all."""
    seq = list(prompt)
    for _ in range(n):
        T = len(seq)
        i, j = np.arange(T)[:, None], np.arange(T)[None]
        mask = (j <= i) & ((j < k) | (j > i - (W - k)))  # (T, T)
        x = model._embed[np.array(seq)][None]  # (1, T, E)
        for attn, blk in zip(model.layers, model._blocks):
            x = x + attn(model._apply_norm(x, blk["norm1"]), mask=mask)
            x = x + model._mlp(model._apply_norm(x, blk["norm2"]), blk, None)
        seq.append(int((model._apply_norm(x, model._norm)[0, -1] @ model._head_t).argmax()))
    return np.array(seq)


def test_kept_first_tokens_are_never_evicted(zoo):
    model = mm.load(zoo("phi3", init=0.25), backend="numpy")
    W, k, prompt = 6, 2, np.arange(3, 13)
    out = model.generate(prompt, 7, attentions=True, stop_at_eos=False, max_cache=W, keep=k)
    np.testing.assert_array_equal(out.ids, _masked_greedy(model, prompt, 7, W, k))
    for s, a in enumerate(out.attentions):
        p = len(prompt) - 1 + s  # the query's position
        seen = np.flatnonzero(a[:, :, -1].sum((0, 1)) > 0)
        assert seen.tolist() == [0, 1] + list(range(p - (W - k) + 1, p + 1)), s
        np.testing.assert_allclose(a[:, :, -1].sum(-1), 1, atol=1e-5)
