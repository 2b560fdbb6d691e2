"""The set-up paths: `pip install -e '.[test]'` is enough for the numpy backend and the property suite
(torch, transformers and the browser stay out of it), `.[dev]` brings everything, and in CI every
optional dependency is there (a test that would skip for want of one fails instead: tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMPORT_NAME = {"mlx": "mlx.core"}  # distribution -> what to import, where they differ


def _extras() -> dict:
    """{extra: [requirement, ...]} from pyproject.toml's [project.optional-dependencies]."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    block = re.sub(r"#[^\n]*", "", block)
    return {name: re.findall(r'"([^"]+)"', body)
            for name, body in re.findall(r"^([\w-]+)\s*=\s*\[(.*?)\]\s*$", block, re.M | re.S)}


def _resolve(extra: str, extras: dict, seen=()) -> set:
    """The distributions ``extra`` brings, its own extras (mha-twin[a,b]) followed."""
    out = set()
    for req in extras[extra]:
        own = re.match(r"mha-twin\[([\w,-]+)\]", req)
        if own:
            for sub in own.group(1).split(","):
                if sub not in seen:
                    out |= _resolve(sub, extras, seen + (extra,))
        else:
            out.add(re.split(r"[\s=<>;\[]", req, maxsplit=1)[0])
    return out


def test_the_test_extra_is_light_and_dev_is_everything():
    extras = _extras()
    light = _resolve("test", extras)
    assert {"hypothesis", "pytest"} <= light
    assert not light & {"torch", "transformers", "playwright", "keras", "flax", "jax", "mlx"}, light
    every = set().union(*(_resolve(e, extras) for e in extras))
    assert _resolve("dev", extras) == every  # the README's test command installs everything


def test_ci_has_every_optional_dependency():
    missing = sorted(d for d in set().union(*(_resolve(e, _extras()) for e in _extras()))
                     if importlib.util.find_spec(IMPORT_NAME.get(d, d).split(".")[0]) is None)
    if missing and not os.environ.get("CI"):
        pytest.skip(f"not installed here: {', '.join(missing)} (pip install -e '.[dev]' brings them)")
    assert not missing, f"CI must install every optional dependency (pip install -e '.[dev]'); missing: {missing}"


def test_skips_for_missing_dependencies_name_the_extra():
    from tests.conftest import _missing

    assert _missing("could not import 'torch': No module named 'torch'").endswith("(pip install -e '.[references]')")
    assert _missing("MLX is not installed").endswith("(pip install -e '.[mlx]')")
    assert _missing("RLIMIT_AS and /proc: Linux") is None  # a platform skip stays a skip, in CI too
