"""mha.training.AttnOnlyDecoder: its loss and gradients equal torch autograd over the same family, it
saves and loads the family's folder, trains on both backends, and refuses bad configs and ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mha.training import Adam, AttnOnlyDecoder

V, E, L, H, P = 23, 12, 2, 3, 11


def model(**kw):
    return AttnOnlyDecoder.init(V, E, L, H, P, seed=4, **kw)


def data(B=3, T=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), rng.random((B, T)) < 0.7


def torch_loss_and_grads(m: AttnOnlyDecoder, ids, targets, mask):
    """The family's forward written in torch (float64) from the state dict, and autograd's gradients."""
    torch = pytest.importorskip("torch")
    c = m.config
    sd = {n: torch.tensor(np.asarray(a, np.float64), requires_grad=True) for n, a in m.state_dict().items()}
    B, T = ids.shape
    D, Hkv = c["head_dim"], c["num_key_value_heads"]
    x = sd["embed_tokens.weight"][torch.tensor(ids)]
    if "embed_positions.weight" in sd:
        x = x + sd["embed_positions.weight"][:T]
    if c["positions"] == "rope":
        pos = torch.arange(T, dtype=torch.float64)[:, None] * c["rope_theta"] ** (-torch.arange(0, D, 2) / D)
        cos, sin = torch.cos(pos), torch.sin(pos)

        def rot(a):  # split-half layout, (B, heads, T, D)
            a1, a2 = a[..., : D // 2], a[..., D // 2:]
            return torch.cat([a1 * cos - a2 * sin, a1 * sin + a2 * cos], -1)
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}.self_attn."

        def proj(name, n):
            y = x @ sd[p + name + ".weight"].T
            if p + name + ".bias" in sd:
                y = y + sd[p + name + ".bias"]
            return y.view(B, T, n, D).transpose(1, 2)

        q, k, v = proj("q_proj", H), proj("k_proj", Hkv), proj("v_proj", Hkv)
        if c["positions"] == "rope":
            q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        s = (q @ k.transpose(-1, -2)) / D ** 0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        a = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, H * D) @ sd[p + "o_proj.weight"].T
        if p + "o_proj.bias" in sd:
            a = a + sd[p + "o_proj.bias"]
        x = x + a
    logits = x @ sd.get("lm_head.weight", sd["embed_tokens.weight"]).T
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, torch.tensor(targets)[..., None])[..., 0]
    m_ = torch.tensor(mask, dtype=torch.float64)
    loss = -(picked * m_).sum() / m_.sum()
    loss.backward()
    return float(loss.detach()), {n: t.grad.numpy() for n, t in sd.items()}, logits.detach().numpy()


def flat_grads(m: AttnOnlyDecoder, grads) -> dict:
    """The gradients keyed by the safetensors names (as state_dict)."""
    probe = AttnOnlyDecoder(m.config, grads)
    return probe.state_dict()


@pytest.mark.parametrize("kw", [dict(), dict(attention_bias=True, tie_word_embeddings=True),
                                dict(positions="rope", num_kv_heads=1, head_dim=6)])
def test_loss_and_gradients_equal_torch(kw):
    m = model(**kw)
    ids, targets, mask = data()
    loss, grads = m.loss_and_grads(ids, targets, mask)
    ref_loss, ref, ref_logits = torch_loss_and_grads(m, ids, targets, mask)
    assert abs(loss - ref_loss) < 1e-5
    assert np.abs(m.logits(ids) - ref_logits).max() < 1e-4 * np.abs(ref_logits).max()
    ours = flat_grads(m, grads)
    assert set(ours) == set(ref)
    for n, g in ref.items():
        assert np.abs(ours[n] - g).max() <= 1e-4 * max(np.abs(g).max(), 1e-3), n


def test_save_load_round_trip(tmp_path):
    m = model(attention_bias=True)
    folder = m.save(tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mha_attn_only"
    again = AttnOnlyDecoder.load(folder)
    ids = data()[0]
    assert np.array_equal(again.logits(ids), m.logits(ids))
    assert again.logits(ids[0]).shape == (9, V)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_a_few_steps_fit_a_batch(backend):
    """Thirty Adam steps on one batch: the loss falls fivefold, on either backend (MLX via mx.vjp)."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    m = model(backend=backend)
    ids, targets, mask = data(B=4, T=8, seed=1)
    opt = Adam(2e-2, clip_norm=1.0)
    first = None
    for _ in range(30):
        loss, grads = m.loss_and_grads(ids, targets, mask)
        first = loss if first is None else first
        m.set_params(opt.update(m.params, grads))
    assert m.loss_and_grads(ids, targets, mask)[0] < first / 5


def test_mlx_and_numpy_gradients_agree():
    pytest.importorskip("mlx.core")
    ids, targets, mask = data()
    a, b = model(), model(backend="mlx")
    la, ga = a.loss_and_grads(ids, targets, mask)
    lb, gb = b.loss_and_grads(ids, targets, mask)
    assert abs(la - lb) < 1e-5
    fa, fb = flat_grads(a, ga), flat_grads(b, gb)
    for n in fa:
        assert np.abs(fa[n] - fb[n]).max() <= 1e-4 * max(np.abs(fa[n]).max(), 1e-3), n


def test_bad_config_and_ids():
    m = model()
    bad = dict(m.config, positions="alibi")
    with pytest.raises(ValueError, match="positions must be 'learned' or 'rope', got 'alibi'"):
        AttnOnlyDecoder(bad, m.params)
    with pytest.raises(ValueError, match="model_type must be 'mha_attn_only', got 'llama'"):
        AttnOnlyDecoder(dict(m.config, model_type="llama"), m.params)
    with pytest.raises(ValueError, match="num_key_value_heads=2 must divide num_attention_heads=3"):
        AttnOnlyDecoder(dict(m.config, num_key_value_heads=2), m.params)
    with pytest.raises(ValueError, match=r"params\['embed_tokens'\] must have shape \(23, 12\)"):
        AttnOnlyDecoder(m.config, dict(m.params, embed_tokens=np.zeros((3, 12), np.float32)))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 23\), got values from 0 to 23"):
        m.logits(np.array([0, 23]))
    with pytest.raises(ValueError, match="ids hold 12 positions, more than max_position_embeddings=11"):
        m.logits(np.zeros(12, int))
    with pytest.raises(ValueError, match="ids must be"):
        m.logits(np.zeros(3))
