"""The mutation harness stays usable: every mutant still applies, and one runs end to end and dies."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mutation import ast_edit, run
from tests.mutation.mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[2]


def test_at_least_fifteen_distinct_mutants():
    assert len(MUTANTS) >= 15
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


@pytest.mark.parametrize("m", MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_once_and_changes_the_code(m):
    import ast

    source = (ROOT / m.path).read_text()
    mutated = ast_edit.apply(source, m.function, m.old, m.new)  # raises unless it occurs exactly once
    assert ast.dump(ast.parse(mutated)) != ast.dump(ast.parse(source)), f"{m.name}: changes nothing"


def test_mutants_survive_reformatting():
    """Anchored on a function and matched as an AST: another layout of the same code still takes them."""
    src = "def f(x):\n    y = x  +  1   # comment\n    return (y *\n            2)\n"
    assert "y = x - 1" in ast_edit.apply(src, "f", "y = x + 1", "y = x - 1")
    assert "return y * 3" in ast_edit.apply(src, "f", "y * 2", "y * 3")
    with pytest.raises(ast_edit.MutantError, match="occurs 0 times"):
        ast_edit.apply(src, "f", "y = x + 2", "pass")
    with pytest.raises(ast_edit.MutantError, match="0 definitions named 'g'"):
        ast_edit.apply(src, "g", "y", "x")


def test_harness_kills_a_mutant():
    pytest.importorskip("mlx.core")
    result = run.run_one(next(m for m in MUTANTS if m.name == "scale-1/D"))
    assert result["killed"] and result["by"] == "numpy:reference"
