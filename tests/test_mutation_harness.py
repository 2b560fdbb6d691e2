"""The mutation harness stays usable: every mutant still applies, and one runs end to end and dies."""

from __future__ import annotations

from pathlib import Path

import pytest

from .mutation import run
from .mutation.mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[1]


def test_at_least_fifteen_distinct_mutants():
    assert len(MUTANTS) >= 15
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


@pytest.mark.parametrize("m", MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_exactly_once(m):
    assert (ROOT / m.path).read_text().count(m.old) == 1, f"{m.name}: source changed; update the mutant"


def test_harness_kills_a_mutant():
    pytest.importorskip("mlx.core")
    result = run.run_one(next(m for m in MUTANTS if m.name == "scale-1/D"))
    assert result["killed"] and result["by"] == "numpy:reference"
