"""The numpy core's backward (mha_cpu._backward_core) with the core's own features, softcap and learned
sinks, against torch autograd of the same core (float64), on the whole-call path and in tiny blocks (rows
crossing key blocks take the forward's lse)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import mha_cpu
from mha._masks import MaskSet
from mha_cpu._backward_core import attention_backward

from tests.helpers import normal, random_bool

torch = pytest.importorskip("torch")

B, H, Hkv, T, S, D = 2, 4, 2, 7, 9, 5


def torch_core(q, k, v, keep, bias, scale, softcap, sinks, dO):
    """(ctx, {q, k, v, sinks: gradient}) in float64: the core written out, sinks as an extra column."""
    t = {n: torch.tensor(np.asarray(a, np.float64), requires_grad=True) for n, a in
         (("q", q), ("k", k), ("v", v)) + ((("sinks", sinks),) if sinks is not None else ())}
    kr, vr = (t[n].repeat_interleave(H // Hkv, 1) for n in ("k", "v"))
    logits = scale * t["q"] @ kr.transpose(-1, -2)  # (B, H, T, S)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits + torch.tensor(bias)
    logits = torch.where(torch.tensor(keep), logits, torch.tensor(float("-inf"), dtype=torch.float64))
    if sinks is not None:
        col = t["sinks"][None, :, None, None].expand(B, H, T, 1)
        P = torch.softmax(torch.cat([logits, col], -1), -1)[..., :S]
    else:
        seen = torch.tensor(keep.any(-1, keepdims=True))
        P = torch.softmax(torch.where(seen, logits, torch.zeros((), dtype=torch.float64)), -1) * seen
    ctx = P @ vr
    ctx.backward(torch.tensor(dO))
    return ctx.detach().numpy(), {n: a.grad.numpy() for n, a in t.items()}


@pytest.mark.parametrize("softcap, with_sinks", [(2.5, False), (None, True), (1.5, True)])
@pytest.mark.parametrize("blocks", [False, True])
def test_softcap_and_sinks(softcap, with_sinks, blocks):
    q, k, v = normal((B, H, T, D), 1, sigma=2.0), normal((B, Hkv, S, D), 2, sigma=2.0), normal((B, Hkv, S, D), 3)
    keep = random_bool((B, 1, T, S), 4)
    keep[0, 0, 3] = False  # a row that sees no key
    bias = normal((1, H, T, S), 5)
    sinks = normal((H,), 6) if with_sinks else None
    dO = normal((B, H, T, D), 7)
    scale = 0.7
    masks = MaskSet.aligned(T, S, keep=keep, bias=bias, causal=True)
    vis = np.broadcast_to(masks.visible(np), (B, H, T, S))
    ctx_ref, ref = torch_core(q, k, v, vis, np.broadcast_to(bias, (B, H, T, S)), scale, softcap, sinks, dO)
    ctx, lse = mha_cpu.attend(q, k, v, masks, scale=scale, softcap=softcap, sinks=sinks)
    assert np.abs(ctx - ctx_ref).max() < 1e-5
    tr = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3)))  # (B, n, L, D) <-> (B, L, n, D)
    with mha_cpu.small_blocks(2, 3) if blocks else contextlib.nullcontext():
        dq, dk, dv, ds = attention_backward(tr(q * np.float32(scale)), tr(k), tr(v), tr(ctx), lse, tr(dO), masks, None,
                                            softcap, sinks)
    for name, ours, theirs in (("q", tr(dq) * scale, ref["q"]), ("k", tr(dk), ref["k"]), ("v", tr(dv), ref["v"])):
        assert np.abs(ours - theirs).max() <= 2e-5 * max(1.0, np.abs(theirs).max()), name
    if with_sinks:
        assert np.abs(ds - ref["sinks"]).max() <= 2e-5 * max(1.0, np.abs(ref["sinks"]).max())
        assert np.abs(ref["sinks"]).max() > 1e-2  # the sinks' gradient is not trivially 0
    else:
        assert ds is None
    if softcap is not None:  # guard: the same backward without the cap's derivative is far off
        _, off = torch_core(q, k, v, vis, np.broadcast_to(bias, (B, H, T, S)), scale, None, sinks, dO)
        assert np.abs(off["q"] - ref["q"]).max() > 100 * 2e-5 * max(1.0, np.abs(ref["q"]).max())


@pytest.mark.parametrize("magnitude", [1.0, 1e20])
def test_rms_norm_backward(magnitude):
    """qk_norm's backward (mha_cpu._backward.rms_norm_backward) against torch autograd, also for entries
    whose squares overflow float32 (the forward scales by a power of two first, so does the backward)."""
    from mha_cpu._backward import rms_norm_backward

    x = normal((3, 4, 5, 6), 1, sigma=magnitude)
    w, dy = normal((6,), 2), normal((3, 4, 5, 6), 3)
    tx, tw = (torch.tensor(a.astype(np.float64), requires_grad=True) for a in (x, w))
    y = tx / torch.sqrt((tx * tx).mean(-1, keepdim=True) + 1e-6) * tw
    y.backward(torch.tensor(dy.astype(np.float64)))
    with np.errstate(over="ignore"):
        dx, dw = rms_norm_backward(x, w, 1e-6, dy)
    assert np.abs(dx - tx.grad.numpy()).max() <= 1e-6 * np.abs(tx.grad.numpy()).max()
    assert np.abs(dw - tw.grad.numpy()).max() <= 1e-6 * np.abs(tw.grad.numpy()).max()
