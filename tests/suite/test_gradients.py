"""The gradient properties of mha.testing: they hold for this project's backends (test_properties runs
them) and for the zoo's peers with autodiff, and they catch planted gradient bugs, among them the
published diagonal-only softmax Jacobian."""

from __future__ import annotations

import importlib.util

import pytest

from mha.testing import check, zoo
from mha.testing.properties import PROPERTIES

from tests.suite import planted_gradients

GRADIENT = [n for n, p in PROPERTIES.items() if p.theme == "gradients"]


def test_gradient_properties_are_registered_and_need_grad():
    assert GRADIENT == ["grad_reference", "grad_directional", "grad_permutation", "grad_hidden_keys"]
    assert all("grad" in PROPERTIES[n].requires for n in GRADIENT)
    report = check(zoo.adapter("torch-mha-weights"), properties=GRADIENT) if importlib.util.find_spec("torch") \
        else check(planted_gradients.adapter().__class__("no-grad", {"mask"}, lambda w: None), properties=GRADIENT)
    assert [s for _, s, _ in report.results] == ["n/a"] * 4 and "needs grad" in report.results[0][2]


def test_a_right_backward_passes():
    report = check(planted_gradients.adapter("right"), properties=GRADIENT, max_examples=8)
    assert not report.failed, str(report)


@pytest.mark.parametrize("bug, caught_by", [
    ("diagonal", {"grad_reference", "grad_directional"}),  # the published one: diag(p) for the Jacobian
    ("gqa_first", {"grad_reference", "grad_directional"}),
])
def test_planted_gradient_bugs_fail(bug, caught_by):
    report = check(planted_gradients.adapter(bug, bug=bug), properties=sorted(caught_by), max_examples=25)
    assert set(report.failed) == caught_by, str(report)


@pytest.mark.parametrize("name", ["torch-sdpa", "mlx-fast-sdpa"])
def test_zoo_autodiff_agrees(name):
    """torch autograd and MLX autodiff through their fused kernels hold to the same properties."""
    if importlib.util.find_spec(zoo.requirement(name)) is None:
        pytest.skip(f"{name} needs {zoo.requirement(name)}")
    report = check(zoo.adapter(name), properties=GRADIENT, max_examples=5)
    assert report.passed == GRADIENT, str(report)


def test_oracle_and_bounds_cover_softcap_qk_norm_and_sinks():
    """The loop oracle and the bounds of grad_reference take the layer's softcap, qk_norm and sinks (for
    when the suite draws them): this project's numpy gradients hold to them, and the oracle without the
    softcap is far off."""
    import numpy as np

    import mha
    from mha.testing import gradients as gr
    from mha.testing import oracle

    from tests.helpers import normal, random_bool, random_weights

    B, T, S, E, H = 2, 5, 7, 12, 4
    rng = np.random.default_rng(0)
    d = {n: a for n, a in random_weights(E, H, Hkv=2, seed=1).to_dict().items() if a is not None}
    w = mha.AttentionWeights(**d, q_norm=rng.uniform(0.5, 2, 3).astype(np.float32),
                             k_norm=rng.uniform(0.5, 2, 3).astype(np.float32),
                             sinks=rng.normal(size=H).astype(np.float32), num_heads=H, num_kv_heads=2)
    x, kv, dy = normal((B, T, E), 2), normal((B, S, E), 3), normal((B, T, E), 4)
    m = random_bool((B, 1, T, S), 5)
    m[0, 0, 2] = False
    opts = dict(softcap=1.5, qk_norm=1e-6)
    layer = mha.MultiHeadAttention.from_weights(w, backend="numpy", **opts)
    _, pull = mha.vjp(layer, x, kv, kv, mask=m, causal=True)
    g = pull(dy)
    ours = dict(query=g.query, key=g.key, value=g.value, **g.weights.to_dict())
    _, g64 = gr.oracle_vjp(w, x, kv, kv, dy, mask=m, causal=True, **opts)
    _, g32 = gr.oracle_vjp(w, x, kv, kv, dy, mask=m, causal=True, dtype=np.float32, **opts)
    _, P = oracle.attention(w, x, kv, kv, mask=m, causal=True, **opts)
    tol = gr.tolerances(g32, g64, gr.magnitudes(w, x, kv, kv, dy, P, mask=m, qk_norm=1e-6))
    gr.assert_gradients_close(ours, g64, tol)
    _, uncapped = gr.oracle_vjp(w, x, kv, kv, dy, mask=m, causal=True, qk_norm=1e-6)
    assert np.abs(uncapped["q_weight"] - g64["q_weight"]).max() > 100 * tol["q_weight"]
