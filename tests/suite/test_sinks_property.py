"""The learned_sinks property and the sink_weights convention: our layers pass, and implementations that
ignore the sinks, renormalise the weights or report them in the other form fail."""

from __future__ import annotations

import numpy as np
import pytest

import mha
from mha.testing import check
from mha.testing.adapters import Adapter, BackendAdapter
from mha.testing.conventions import validate
from tests.conftest import HAS_MLX

FEATURES = {"cross", "bias", "mask", "key_mask", "causal", "gqa", "weights", "sinks"}


def _adapter(name, *, strip=False, weights=None, conventions=None):
    """Our numpy layer declaring "sinks", with a planted fault: ``strip`` builds it without the sinks;
    ``weights`` rewrites the weights it returns ("renormalised": rows scaled to sum to 1; "column": the
    sink's share appended as column S + 1)."""
    def build(w):
        if strip:
            d = w.to_dict()
            d["sinks"] = None
            w = mha.AttentionWeights(**d, num_heads=w.num_heads, num_kv_heads=w.num_kv_heads)
        layer = mha.MultiHeadAttention.from_weights(w, backend="numpy")

        def fn(query, key, value, **kwargs):
            res = layer(query, key, value, **kwargs)
            if not kwargs.get("return_weights"):
                return res
            y, P = res
            total = P.sum(-1, keepdims=True)
            if weights == "renormalised":
                P = np.where(total > 0, P / np.where(total > 0, total, 1), 0)
            elif weights == "column":
                P = np.concatenate([P, np.where(P.any(-1, keepdims=True), 1 - total, 1.0)], -1)
            return y, P
        return fn

    return Adapter(name, FEATURES, build, conventions=conventions or {})


def test_our_layers_pass():
    for backend in ("numpy", "mlx") if HAS_MLX else ("numpy",):
        assert "sinks" in BackendAdapter(backend).features
        report = check(BackendAdapter(backend), properties=["learned_sinks"], max_examples=40)
        assert not report.failed, str(report)


@pytest.mark.parametrize("fault, conventions, fails", [
    (dict(strip=True), None, True),  # the sinks ignored: every output off
    (dict(weights="renormalised"), None, True),  # weights summing to 1 although the sink took a share
    (dict(weights="column"), None, True),  # S + 1 columns where "dropped" is declared
    (dict(weights="column"), {"sink_weights": "column"}, False),  # ... and declared: the other convention
    (dict(), {"sink_weights": "column"}, True),  # declared "column" but the sink's column is missing
])
def test_the_property_catches_what_is_wrong(fault, conventions, fails):
    report = check(_adapter("planted", conventions=conventions, **fault), properties=["learned_sinks"],
                   max_examples=25)
    assert bool(report.failed) == fails, str(report)


def test_the_convention_is_declared_and_checked():
    assert validate({"sink_weights": "column"})["sink_weights"] == "column"
    assert validate(None)["sink_weights"] == "dropped"
    with pytest.raises(ValueError, match="sink_weights"):
        validate({"sink_weights": "kept"})


def test_detect_tells_the_two_forms_apart():
    from mha.testing import detect

    assert detect(_adapter("ours"), max_examples=3)["sink_weights"] == "dropped"
    assert detect(_adapter("column", weights="column"), max_examples=3)["sink_weights"] == "column"
    found = detect(_adapter("renormalised", weights="renormalised"), max_examples=3)
    assert found["sink_weights"] == "inconsistent" and "Probe(" in found.examples["sink_weights"]
