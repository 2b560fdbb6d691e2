"""mha.training.Adam against torch.optim.AdamW step by step, clipping by the global norm, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.training import Adam, global_norm

from tests.helpers import normal, random_weights


def _torch_steps(params: dict, grads_seq: list, lr, wd, clip, betas=(0.9, 0.999), eps=1e-8):
    torch = pytest.importorskip("torch")
    ts = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in params.items()}
    opt = torch.optim.AdamW(list(ts.values()), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for grads in grads_seq:
        for n, t in ts.items():
            t.grad = torch.tensor(grads[n], dtype=torch.float64)
        if clip is not None:  # the global norm's clip (torch's clip_grad_norm_ adds 1e-6 to the norm)
            norm = float(torch.sqrt(sum((t.grad ** 2).sum() for t in ts.values())))
            for t in ts.values():
                t.grad *= min(1.0, clip / norm)
        opt.step()
    return {n: t.detach().numpy() for n, t in ts.items()}


@pytest.mark.parametrize("wd, clip", [(0.0, None), (0.1, None), (0.05, 0.5)])
def test_matches_torch_adamw(wd, clip):
    """Five steps on a nested mapping equal torch.optim.AdamW (with clip_grad_norm_) to float64 rounding."""
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 5)), "b": {"c": rng.normal(size=7)}}
    flat = {"a": params["a"], "b.c": params["b"]["c"]}
    grads = [{"a": rng.normal(size=(3, 5)), "b.c": rng.normal(size=7)} for _ in range(5)]
    opt = Adam(0.01, weight_decay=wd, clip_norm=clip)
    p = params
    for g in grads:
        p = opt.update(p, {"a": g["a"], "b": {"c": g["b.c"]}})
    ref = _torch_steps(flat, grads, 0.01, wd, clip)
    assert np.allclose(p["a"], ref["a"], rtol=0, atol=1e-12)
    assert np.allclose(p["b"]["c"], ref["b.c"], rtol=0, atol=1e-12)
    assert opt.step == 5 and np.isclose(opt.last_norm, global_norm({"a": grads[-1]["a"], "c": grads[-1]["b.c"]}))


def test_updates_attention_weights_and_trains_a_layer():
    """On mha.AttentionWeights with mha.vjp's gradients: the same structure comes back, and thirty steps
    fit a teacher layer's outputs (the loss falls tenfold); the learning rate may be a schedule."""
    E, H = 12, 4
    teacher = mha.MultiHeadAttention.from_weights(random_weights(E, H, seed=1))
    student = mha.MultiHeadAttention.from_weights(random_weights(E, H, seed=2))
    x = normal((8, 5, E), 3)
    target = teacher(x, causal=True)
    opt = Adam(lambda t: 0.03 * min(1.0, t / 3), clip_norm=10.0)
    losses = []
    for _ in range(30):
        out, pull = mha.vjp(student, x, causal=True)
        losses.append(float(((out - target) ** 2).mean()))
        g = pull(2 * (out - target) / out.size)
        new = opt.update(student.weights, g.weights)
        assert isinstance(new, mha.AttentionWeights) and new.num_heads == H and new.dtype == np.float32
        student.set_weights(new)
    assert losses[-1] < 0.1 * losses[0]


def test_bad_input_changes_nothing():
    opt = Adam(0.1)
    p = {"a": np.ones(3)}
    with pytest.raises(ValueError, match=r"missing \['a'\], unexpected \['b'\]"):
        opt.update(p, {"b": np.ones(3)})
    with pytest.raises(ValueError, match=r"gradient of a has shape \(4,\), the parameter \(3,\)"):
        opt.update(p, {"a": np.ones(4)})
    with pytest.raises(ValueError, match="gradient of a holds NaN or inf; nothing was updated"):
        opt.update(p, {"a": np.array([1.0, np.nan, 0.0])})
    assert opt.step == 0
    for kwargs, match in ((dict(learning_rate=0), "learning_rate must be a positive"),
                          (dict(betas=(0.9, 1.0)), "betas must be two numbers in"),
                          (dict(weight_decay=-1), "weight_decay must be a number >= 0"),
                          (dict(clip_norm=float("inf")), "clip_norm must be a positive finite")):
        with pytest.raises(ValueError, match=match):
            Adam(**kwargs)
    with pytest.raises(TypeError, match="parameters must be an mha.AttentionWeights or a mapping"):
        opt.update([1.0], [1.0])
