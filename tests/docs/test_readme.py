"""The README stays true: its Python snippets run, and CI runs its test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_python_snippet_runs(code, tmp_path, monkeypatch):
    if "mlx" in code:
        pytest.importorskip("mlx.core")
    if "torch" in code:
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2
    install_and_demo, tests = commands
    assert "mha demo --model builtin" in install_and_demo and "pip install -e ." in install_and_demo
    test_cmd = tests.split(" && ", 2)[2]  # after creating and activating the venv
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_property_count_in_readme():
    from mha.testing.properties import PROPERTIES

    assert f"{len(PROPERTIES)} properties" in README
