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
    """A number of properties the README states (it need not state one) is the suite's."""
    from mha.testing.properties import PROPERTIES

    for n in re.findall(r"(?<!fails )\b(\d+) properties\b", README):  # not "it fails 7 properties"
        assert int(n) == len(PROPERTIES), n


def test_the_readmes_adapter_runs_under_mha_check(tmp_path):
    """The README's "Check your own attention": its mymod.py, run as `mha check --impl mymod:factory`, gives
    the table and the failure it shows (the -1e9 fill), and passes what a correct function passes."""
    import subprocess
    import sys

    (code,) = [b for b in BLOCKS if "def factory" in b]
    (tmp_path / "mymod.py").write_text(code)
    assert "mha check --impl mymod:factory" in README
    res = subprocess.run([sys.executable, "-m", "mha_cli", "check", "--impl", "mymod:factory", "--property",
                          "empty_rows_output_bias", "--property", "permutation_equivariance", "--examples", "20"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert "mymod FAILS empty_rows_output_bias: outputs of queries that see no key" in res.stdout
    assert "rerun: mha check --impl mymod:factory --property empty_rows_output_bias" in res.stdout
    assert re.search(r"^permutation_equivariance +pass$", res.stdout, re.M)


def test_readme_is_short_with_a_picture_near_the_top():
    lines = README.splitlines()
    assert len(lines) <= 300, len(lines)
    assert any(re.match(r"!\[.*\]\(docs/\S+\.png\)", ln) for ln in lines[:60])
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png))\)", README):
        assert (ROOT / target).exists(), target
