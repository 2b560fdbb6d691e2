"""The suite's tools around check(): `mha check --detect / --numerics / --conventions`, the numerics
report, the pytest plugin and the conformance table of docs/conformance.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mha.testing import conformance
from mha.testing.adapters import BackendAdapter
from mha.testing.numerics import measure, round_to
from mha.testing.properties import PROPERTIES
from mha_cli.main import cli
from tests.suite.synthetic_attention import synthetic

ROOT = Path(__file__).resolve().parents[2]


def test_detect_command_json_and_table():
    pytest.importorskip("torch")
    res = CliRunner().invoke(cli, ["check", "--detect", "--impl", "numpy", "--impl", "torch-sdpa", "--examples", "2",
                                   "--json"])
    assert res.exit_code == 0, res.output
    data = {d["impl"]: d for d in json.loads(res.stdout)}
    assert data["numpy"]["conventions"] == {"causal": "bottom_right", "empty_row": "output_bias",
                                            "nonfinite": "isolated", "sink_weights": "dropped"}
    assert data["torch-sdpa"]["conventions"]["causal"] == "top_left"
    assert data["torch-sdpa"]["examples"]["causal"].startswith("Probe(")
    res = CliRunner().invoke(cli, ["check", "--detect", "--impl", "torch-sdpa", "--examples", "2"])
    assert res.exit_code == 0 and "top_left" in res.stdout and "torch-sdpa causal=top_left: Probe(" in res.stdout


def test_check_with_detected_conventions():
    pytest.importorskip("torch")
    args = ["check", "--impl", "torch-sdpa", "--property", "causal_decoding", "--examples", "5", "--json"]
    res = CliRunner().invoke(cli, args + ["--conventions", "detected"])
    assert res.exit_code == 0, res.output
    (report,) = json.loads(res.stdout)
    assert report["conventions"]["causal"] == "top_left" and report["results"][0]["status"] == "pass"


def test_bad_implementation_and_flags_are_one_line_usage_errors():
    from mha.testing import zoo
    from mha_cli.check import ZOO_NAMES

    assert ZOO_NAMES == tuple(zoo.ZOO)
    res = CliRunner().invoke(cli, ["check", "--impl", "nope"])
    assert res.exit_code == 2 and "'nope' is not an implementation" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["check", "--detect", "--numerics", "--impl", "numpy"])
    assert res.exit_code == 2 and "separate reports" in res.output


def test_numerics_command_and_report():
    res = CliRunner().invoke(cli, ["check", "--numerics", "--impl", "numpy", "--examples", "3", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["dtype"] for r in rows] == ["float32", "float64"]
    assert all(0 < r["median"] <= r["p99"] <= r["max"] < 1 for r in rows)


def test_numerics_sees_a_bug_and_rounds_like_the_hardware():
    (row,) = measure(synthetic(bug="scale"), examples=3)
    assert row.max > 1  # a wrong scale is far beyond the bound
    (row,) = measure(synthetic(), examples=3)
    assert row.max < 1
    x = np.array([1.0 + 2**-9, 1.0 + 3 * 2**-9, -3.14159, 65504.0], np.float32)
    assert round_to(x, "bfloat16").tolist() == [1.0, 1.0 + 2**-7, -3.140625, 65536.0]  # ties to even
    assert round_to(x, "float16").tolist() == x.astype(np.float16).astype(np.float32).tolist()
    with pytest.raises(ValueError, match="dtype must be one of"):
        round_to(x, "int8")
    with pytest.raises(ValueError, match="examples must be a positive int"):
        measure(synthetic(), examples=0)


def _pytest(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_pytest_plugin_runs_the_suite_as_items(tmp_path):
    res = _pytest("--mha-impl", "tests.suite.synthetic_attention:planted_scale", "--mha-examples", "5", "-rfs",
                  cwd=tmp_path)
    out = res.stdout
    assert res.returncode == 1, out
    assert "FAILED ::mha[synthetic-scale]::reference" in out
    n_na = sum(1 for p in PROPERTIES.values() if p.not_applicable(synthetic().features, {}))
    assert f"{n_na} skipped" in out and "n/a: needs" in out
    res = _pytest("--mha-impl", "tests.suite.synthetic_attention:correct", "--mha-examples", "3", "-k", "reference or causal",
                  cwd=tmp_path)
    assert res.returncode == 0 and "5 passed" in res.stdout, res.stdout


def test_pytest_plugin_refuses_a_bad_spec(tmp_path):
    from mha.testing.pytest_plugin import load_factory

    for spec, msg in (("nope", "must be of the form package.module:factory"),
                      ("a:b:c", "must be of the form"),
                      ("tests.suite.synthetic_attention:missing", "has no 'missing'"),
                      ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                      ("tests.suite.synthetic_attention:FEATURES", "not an adapter")):
        with pytest.raises(ValueError, match=msg):
            load_factory(spec)
    assert load_factory("tests.suite.synthetic_attention:correct").name == "synthetic-ok"
    res = _pytest("--mha-impl", "nope", cwd=tmp_path)  # a usage error: one line, no traceback
    assert res.returncode == 4 and "--mha-impl must be of the form" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_readme_conformance_table_is_the_commands_format():
    text = (ROOT / "docs" / "conformance.md").read_text()
    table = conformance.parse(text)
    assert {"numpy", "torch-sdpa", "torch-mha-weights"} <= set(table)
    for impl, cells in table.items():
        assert list(cells) == list(PROPERTIES), impl
        assert set(cells.values()) <= {"pass", "**FAIL**", "n/a"}
    # one row regenerated, quickly: our numpy backend passes everything, as docs/conformance.md says
    block = conformance.markdown(conformance.run(["numpy"], 2), 2)
    assert conformance.parse(block)["numpy"] == table["numpy"]


def test_conformance_write_replaces_only_the_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{conformance.BEGIN}\nold\n{conformance.END}\nafter\n")
    conformance.write(str(doc), f"{conformance.BEGIN}\nnew\n{conformance.END}")
    assert doc.read_text() == f"before\n{conformance.BEGIN}\nnew\n{conformance.END}\nafter\n"
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="has no conformance block"):
        conformance.write(str(doc), "x")
