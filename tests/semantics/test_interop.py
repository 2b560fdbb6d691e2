"""Independent references: torch.nn.MultiheadAttention, torch SDPA (GQA) and mlx.nn.MultiHeadAttention."""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.testing import oracle, tolerance

from tests.helpers import normal, random_bool, random_weights

torch = pytest.importorskip("torch")

B, T, S, E, H = 3, 5, 7, 12, 4


def _no_empty_rows(keep):
    keep = keep.copy()
    keep[..., 0] = True  # every query sees key 0, so torch's NaN rows never arise
    return keep


def _torch_mha(kdim=None, vdim=None, bias=True, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True)
    with torch.no_grad():  # non-zero biases, so a dropped bias would show
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.5)
    return m.eval()


@pytest.mark.parametrize("kdim,vdim", [(None, None), (7, 11)], ids=["packed", "separate"])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "key", "causal", "all"])
def test_matches_torch_multihead_attention(backend, kdim, vdim, masks):
    m = _torch_mha(kdim, vdim)
    w = mha.AttentionWeights.from_torch(m)
    cross = kdim is not None
    x = normal((B, T, E), 1)
    k = normal((B, S, kdim), 2) if cross else x
    v = normal((B, S, vdim), 3) if cross else x
    Sx = S if cross else T
    keep = _no_empty_rows(random_bool((B, H, T, Sx), 4))
    add = normal((B, H, T, Sx), 5, sigma=2.0)
    km = random_bool((B, Sx), 6)
    km[:, 0] = True
    ours, theirs = {}, {}
    if masks in ("bool", "all"):
        ours["mask"], theirs["attn_mask"] = keep, torch.from_numpy(~keep).reshape(B * H, T, Sx)
    if masks == "float":
        ours["mask"], theirs["attn_mask"] = add, torch.from_numpy(add).reshape(B * H, T, Sx)
    if masks in ("key", "all"):
        ours["key_mask"], theirs["key_padding_mask"] = km, torch.from_numpy(~km)
    if masks in ("causal", "all"):
        causal = np.tril(np.ones((T, Sx), bool), Sx - T)
        ours["causal"] = True
        prev = theirs.get("attn_mask")
        c = torch.from_numpy(~causal)
        theirs["attn_mask"] = c if prev is None else prev | c
    with torch.no_grad():
        y_t, P_t = m(torch.from_numpy(x), torch.from_numpy(k), torch.from_numpy(v), need_weights=True,
                     average_attn_weights=False, **theirs)
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    y, P = layer(x, k if cross else None, v if cross else None, return_weights=True, **ours)
    y_fast = layer(x, k if cross else None, v if cross else None, **ours)
    y_ref = oracle.attention(w, x, k, v, **ours)[0]
    M = tolerance.magnitude(w, x, k, v, y_ref=y_ref, mask=ours.get("mask"))
    tol = tolerance.t2("float32", "float32", M)
    tolerance.assert_close(mha.to_numpy(y), y_t.numpy(), tol, "output vs torch")
    tolerance.assert_close(mha.to_numpy(y_fast), y_t.numpy(), tol, "fast output vs torch")
    tolerance.assert_close(mha.to_numpy(P), P_t.numpy(), tol, "weights vs torch")


def test_from_torch_state_dict_and_prefix():
    m = _torch_mha(7, 11)
    sd = {f"encoder.attn.{k}": v for k, v in m.state_dict().items()}
    w1 = mha.AttentionWeights.from_torch(m)
    w2 = mha.AttentionWeights.from_torch(sd, num_heads=H, prefix="encoder.attn.")
    assert w1 == w2 and w1.kdim == 7 and w1.vdim == 11
    packed = _torch_mha()
    w3 = mha.AttentionWeights.from_torch(packed.state_dict(), num_heads=H)
    np.testing.assert_array_equal(w3.k_weight, packed.in_proj_weight.detach().numpy()[E:2 * E])
    nb = mha.AttentionWeights.from_torch(_torch_mha(bias=False))
    assert not nb.bias


def test_from_torch_rejects_what_it_cannot_represent():
    m = torch.nn.MultiheadAttention(E, H, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        mha.AttentionWeights.from_torch(m)
    with pytest.raises(TypeError, match="needs num_heads="):
        mha.AttentionWeights.from_torch(_torch_mha().state_dict())
    sd = dict(_torch_mha().state_dict())
    sd["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        mha.AttentionWeights.from_torch(sd, num_heads=H)
    del sd["extra.weight"], sd["out_proj.weight"]
    with pytest.raises(ValueError, match="missing key 'out_proj.weight'"):
        mha.AttentionWeights.from_torch(sd, num_heads=H)


@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (6, 3), (5, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_matches_torch_sdpa_enable_gqa(backend, Hq, Hkv, causal):
    """Torch's own GQA (enable_gqa=True) fixes the grouping order: query head h reads kv head h // G."""
    F = torch.nn.functional
    Ex = Hq * 3
    w = random_weights(Ex, Hq, Hkv=Hkv, seed=7)
    x = normal((B, T, Ex), 8)
    kv = normal((B, S, Ex), 9)
    keep = _no_empty_rows(random_bool((B, 1, T, S), 10))
    tw = {n: torch.from_numpy(a) for n, a in w.to_dict().items()}
    D = Ex // Hq
    q = (torch.from_numpy(x) @ tw["q_weight"].T + tw["q_bias"]).reshape(B, T, Hq, D).transpose(1, 2)
    k = (torch.from_numpy(kv) @ tw["k_weight"].T + tw["k_bias"]).reshape(B, S, Hkv, D).transpose(1, 2)
    v = (torch.from_numpy(kv) @ tw["v_weight"].T + tw["v_bias"]).reshape(B, S, Hkv, D).transpose(1, 2)
    full = keep & np.tril(np.ones((T, S), bool), S - T) if causal else keep
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(full), enable_gqa=True)
    y_t = ctx.transpose(1, 2).reshape(B, T, Ex) @ tw["o_weight"].T + tw["o_bias"]
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    M = tolerance.magnitude(w, x, kv, y_ref=y_t.numpy())
    for rw in (False, True):
        y = layer(x, kv, mask=keep, causal=causal, return_weights=rw)
        y = y[0] if rw else y
        tolerance.assert_close(mha.to_numpy(y), y_t.numpy(), tolerance.t2("float32", "float32", M),
                               f"GQA {Hq}:{Hkv} vs torch (weights={rw})")


@pytest.mark.parametrize("bias", [False, True])
def test_matches_mlx_nn_multihead_attention(backend, bias):
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as nn

    mx.random.seed(3)
    ref = nn.MultiHeadAttention(E, H, bias=bias)
    w = mha.AttentionWeights.from_mlx(ref)
    x = normal((B, T, E), 11)
    kv = normal((B, S, E), 12)
    add = normal((B, 1, T, S), 13)
    y_m = np.array(ref(mx.array(x), mx.array(kv), mx.array(kv), mask=mx.array(add)))
    layer = mha.MultiHeadAttention.from_weights(w, backend=backend)
    M = tolerance.magnitude(w, x, kv, y_ref=y_m, mask=add)
    for rw in (False, True):
        y = layer(x, kv, mask=add, return_weights=rw)
        tolerance.assert_close(mha.to_numpy(y[0] if rw else y), y_m, tolerance.t2("float32", "float32", M),
                               "vs mlx.nn.MultiHeadAttention")


def test_from_mlx_rejects_other_objects():
    with pytest.raises(TypeError, match="from_mlx expects an mlx.nn.MultiHeadAttention"):
        mha.AttentionWeights.from_mlx(object())
