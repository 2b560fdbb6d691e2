"""The conformance suite (mha.testing) on both of this project's backends: every property must hold.

The same properties run on third-party layers through `mha check` (see test_check_cli.py); here a
failure is a bug in this project.
"""

from __future__ import annotations

import pytest

from mha.testing import run_property
from mha.testing.adapters import FEATURES, BackendAdapter
from mha.testing.properties import PROPERTIES


def test_suite_is_complete():
    assert len(PROPERTIES) >= 25
    for p in PROPERTIES.values():
        assert p.doc, f"{p.name} states no property"
        assert p.requires <= FEATURES and p.requires_any <= FEATURES


def _run(adapter, name):
    reason = PROPERTIES[name].not_applicable(adapter.features, {}, adapter.dtypes)
    if reason:  # float64_range on MLX, which has no float64
        pytest.skip(f"n/a on {adapter.name}: {reason}")
    run_property(adapter, name)


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_property(backend, name):
    _run(BackendAdapter(backend), name)


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_property_numpy_tiny_blocks(name):
    """The numpy fast path with 2-query, 3-key blocks: every small problem crosses block edges and runs
    the online softmax (running max and sum, causal block skipping)."""
    _run(BackendAdapter("numpy", blocks=(2, 3)), name)
