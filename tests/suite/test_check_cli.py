"""`mha check`: our backends pass; torch and mlx.nn run to the end and their violations are reported."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mha_cli.main import cli


@pytest.mark.slow  # the whole suite through the CLI (~75 s); tests/suite/test_properties.py runs every property
def test_our_backends_pass():
    res = CliRunner().invoke(cli, ["check", "--impl", "numpy", "--impl", "mlx", "--examples", "8"])
    assert res.exit_code == 0, res.output
    assert "FAIL" not in res.output and "reference" in res.output


def test_third_party_layers_are_reported_not_errors():
    pytest.importorskip("torch")
    pytest.importorskip("mlx.nn")
    props = ["empty_rows_output_bias", "gqa_equals_repeated_kv", "weights_contract", "causal_first_token",
             "permutation_equivariance"]
    res = CliRunner().invoke(cli, ["check", "--impl", "torch", "--impl", "mlx-nn", "--examples", "10", "--json",
                                   *(a for p in props for a in ("--property", p))])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    status = {(r["impl"], x["property"]): x["status"] for r in data for x in r["results"]}
    # torch gives NaN for a query with no visible key; MLX's fused kernel gives the mean of the values.
    assert status[("torch", "empty_rows_output_bias")] == "fail"
    assert status[("mlx-nn", "empty_rows_output_bias")] == "fail"
    assert status[("torch", "gqa_equals_repeated_kv")] == "n/a"
    assert status[("mlx-nn", "weights_contract")] == "n/a"
    assert status[("torch", "causal_first_token")] == "pass"  # no masks drawn: no empty rows
    # held to this project's conventions, torch's NaN rows fail every property that draws an empty row
    assert status[("torch", "permutation_equivariance")] == "fail"
    nan = next(x for r in data if r["impl"] == "torch" for x in r["results"] if x["property"] == "permutation_equivariance")
    assert "torch returned np.float32(nan)" in nan["detail"] and "real float, finite" in nan["detail"]
    failing = next(x for r in data for x in r["results"] if x["status"] == "fail")
    assert "falsifying example: Problem(" in failing["detail"]


def test_list_and_bad_property():
    res = CliRunner().invoke(cli, ["check", "--list"])
    assert res.exit_code == 0 and "permutation_equivariance" in res.output
    res = CliRunner().invoke(cli, ["check", "--property", "nope"])
    assert res.exit_code == 2 and "unknown property 'nope'" in res.output


def test_a_failing_backend_exits_1(monkeypatch):
    from mha.testing.properties import PROPERTIES

    def broken(impl, p):
        raise AssertionError("planted")

    prop = PROPERTIES["reference"]
    monkeypatch.setitem(PROPERTIES, "reference", type(prop)(prop.name, prop.requires, prop.requires_any,
                                                            prop.strategy, broken, prop.theme))
    res = CliRunner().invoke(cli, ["check", "--impl", "numpy", "--property", "reference", "--examples", "2"])
    assert res.exit_code == 1
    assert "FAIL" in res.output and "planted" in res.output
