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
    report = check(planted_gradients.adapter(bug, bug=bug), properties=sorted(caught_by), max_examples=10)
    assert set(report.failed) == caught_by, str(report)


@pytest.mark.parametrize("name", ["torch-sdpa", "mlx-fast-sdpa"])
def test_zoo_autodiff_agrees(name):
    """torch autograd and MLX autodiff through their fused kernels hold to the same properties."""
    if importlib.util.find_spec(zoo.requirement(name)) is None:
        pytest.skip(f"{name} needs {zoo.requirement(name)}")
    report = check(zoo.adapter(name), properties=GRADIENT, max_examples=5)
    assert report.passed == GRADIENT, str(report)
