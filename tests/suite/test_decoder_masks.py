"""The masks users send (issue 29): Hugging Face's left padding with causal attention, the most common decoder
batch, is drawn by the strategies, and the suite fails an implementation that hides keys with float32's most
negative number (what fused kernels do), which ties them with visible keys that carry that value."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import find, settings

from mha.testing import check
from mha.testing import strategies as mst

from tests.suite.synthetic_attention import FEATURES, synthetic

FMIN = float(np.finfo(np.float32).min)
DECODER = {"additive_mask", "causal", "bias"}  # what a decoder layer declares: additive padding, causal


def _leaky_row(p) -> bool:
    """A query whose every visible key carries finfo.min while the causal rule hides a key that does not."""
    if p.mask is None or p.mask.dtype.kind != "f" or not p.causal:
        return False
    vis = p.visible()  # (B, H, T, S)
    fill = np.broadcast_to(p.mask.reshape((1,) * (4 - p.mask.ndim) + p.mask.shape), vis.shape) == np.float32(FMIN)
    causal_only = ~vis & ~fill & (np.arange(p.config.S) > np.arange(p.config.T)[:, None] + p.config.S - p.config.T)
    rows = vis.any(-1) & ~(vis & ~fill).any(-1) & causal_only.any(-1)
    return bool(rows.any())


@pytest.mark.parametrize("features", [DECODER, FEATURES], ids=["decoder", "all"])
def test_the_strategies_draw_padding_queries_of_a_causal_left_padded_batch(features):
    found = find(mst.problems(features), _leaky_row, settings=settings(max_examples=200, database=None))
    assert found.causal and found.mask.shape == (found.config.B, 1, 1, found.config.S)


@pytest.mark.parametrize("features", [DECODER, FEATURES - {"weights"},
                                      pytest.param(FEATURES, marks=pytest.mark.slow)],
                         ids=["decoder", "no-weights", "all"])
def test_a_finfo_min_fill_fails_the_suite(features):
    names = ["causal_prefix", "masked_keys_irrelevant", "large_negative_bias", "reference"]
    planted = check(synthetic("fused-fill", bug="finfo_fill", features=features), properties=names, max_examples=50)
    assert "causal_prefix" in planted.failed or "masked_keys_irrelevant" in planted.failed, planted
    detail = dict((n, d) for n, _, d in planted.results)[planted.failed[0]]
    assert "not bitwise identical" in detail and "falsifying example: Problem(" in detail
    # the same attention with hidden keys removed (-inf) passes the same properties: the fill is the bug
    assert check(synthetic("removed", features=features), properties=names, max_examples=50).failed == []
