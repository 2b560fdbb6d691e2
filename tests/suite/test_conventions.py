"""Declared conventions: check() holds an implementation to them, detect() finds them.

The implementations are small hand-written numpy attentions (tests/synthetic_attention.py), one per
value of each convention, plus planted bugs that must still fail under any honest declaration.
"""

from __future__ import annotations

import numpy as np
import pytest

from mha.testing import check, detect
from mha.testing.adapters import Adapter, BackendAdapter
from mha.testing.conventions import DEFAULTS, describe, validate, with_conventions
from tests.conftest import HAS_MLX
from tests.suite.synthetic_attention import attention_fn, synthetic

# the properties whose expectation depends on a convention, and a few that pin the arithmetic
DEPENDENT = ["reference", "masked_keys_irrelevant", "large_negative_bias", "nonfinite_hidden_isolation",
             "empty_rows_output_bias", "mask_algebra", "nonfinite_visible_confined", "nonfinite_self_attention",
             "causal_prefix", "causal_append", "causal_decoding", "weights_contract", "weights_match_output",
             "single_head", "value_bias_affinity", "zero_scale_mean", "batch_independence"]
N = 10


def test_validate_names_the_argument():
    assert validate(None) == DEFAULTS
    assert validate({"causal": "top_left"})["causal"] == "top_left"
    with pytest.raises(ValueError, match=r"conventions: unknown convention 'mask'"):
        validate({"mask": "x"})
    with pytest.raises(ValueError, match=r"conventions\['empty_row'\] must be one of output_bias, nan, mean_value"):
        validate({"empty_row": "zero"})
    with pytest.raises(TypeError, match="conventions must be a dict"):
        validate("top_left")
    with pytest.raises(ValueError, match=r"conventions\['causal'\]"):
        Adapter("bad", {"causal"}, build=lambda w: None, conventions={"causal": "diagonal"})
    bad = Adapter("bad", {"mask"}, build=lambda w: None)
    bad.conventions = {"nonfinite": "sometimes"}
    with pytest.raises(ValueError, match=r"bad.conventions\['nonfinite'\]"):
        check(bad, properties=["reference"], max_examples=1)


def test_describe_and_with_conventions():
    assert describe(DEFAULTS) == "defaults"
    a = with_conventions(synthetic(), {"empty_row": "nan", "causal": "inconsistent"})
    assert a.conventions == {**DEFAULTS, "empty_row": "nan"} and a.name == "synthetic"
    assert describe(a.conventions) == "empty_row=nan"


CONFORMING = [{}, {"causal": "top_left"}, {"empty_row": "nan"}, {"empty_row": "mean_value"},
              {"nonfinite": "propagates"}, {"empty_row": "mean_value", "nonfinite": "propagates"},
              {"causal": "top_left", "empty_row": "nan", "nonfinite": "propagates"}]


@pytest.mark.parametrize("conv", CONFORMING, ids=lambda c: describe({**DEFAULTS, **c}))
def test_a_conforming_implementation_of_each_convention_passes(conv):
    report = check(synthetic(**conv), properties=DEPENDENT, max_examples=N)
    assert not report.failed, str(report)
    assert report.conventions == {**DEFAULTS, **conv}


@pytest.mark.parametrize("follows, declares, must_fail", [
    ({"causal": "top_left"}, {}, "causal_decoding"),
    ({"empty_row": "nan"}, {}, "empty_rows_output_bias"),
    ({"empty_row": "mean_value"}, {}, "empty_rows_output_bias"),
    ({"empty_row": "mean_value"}, {"empty_row": "nan"}, "empty_rows_output_bias"),
    ({"empty_row": "nan"}, {"empty_row": "mean_value"}, "weights_contract"),
    ({"nonfinite": "propagates"}, {}, "nonfinite_hidden_isolation"),
    ({}, {"causal": "top_left"}, "causal_decoding"),
], ids=lambda x: x if isinstance(x, str) else describe({**DEFAULTS, **x}))
def test_a_wrong_declaration_fails(follows, declares, must_fail):
    report = check(synthetic(**follows, declare=declares), properties=[must_fail, "reference"], max_examples=N)
    assert must_fail in report.failed, str(report)


@pytest.mark.parametrize("bug, declare, must_fail", [
    ("scale", {}, "reference"),
    ("scale", {"empty_row": "unspecified", "nonfinite": "propagates"}, "reference"),
    ("top_left", {}, "causal_decoding"),  # top-left causal declared bottom-right
    ("leak", {}, "nonfinite_hidden_isolation"),  # NaN leaks through 0 * NaN, declared isolated
    ("leak", {"empty_row": "nan"}, "nonfinite_visible_confined"),
])
def test_planted_bugs_fail_under_their_declared_conventions(bug, declare, must_fail):
    report = check(synthetic(bug=bug, declare=declare), properties=[must_fail], max_examples=N)
    assert must_fail in report.failed, str(report)


def test_unspecified_empty_rows_are_left_out_and_said_so():
    for follows in ("nan", "mean_value"):
        report = check(synthetic(empty_row=follows, declare={"empty_row": "unspecified"}), properties=DEPENDENT,
                       max_examples=N)
        assert not report.failed, str(report)
        status = {n: (s, d) for n, s, d in report.results}
        assert status["empty_rows_output_bias"][0] == "n/a"
        assert "empty_row=unspecified" in status["empty_rows_output_bias"][1]


@pytest.mark.parametrize("conv", CONFORMING[:5], ids=lambda c: describe({**DEFAULTS, **c}))
def test_detect_finds_each_convention(conv):
    found = detect(synthetic(**conv), max_examples=4)
    assert dict(found) == {**DEFAULTS, "sink_weights": "n/a", **conv}  # no learned sinks: nothing to see
    for key, value in conv.items():  # each non-default value comes with an example
        assert found.examples[key].startswith("Probe(B=1, T=1, S=3")  # the smallest probe already shows it


def test_detect_sees_through_a_bug_elsewhere():
    """A wrong scale is no convention: the probes compare the implementation with itself."""
    assert dict(detect(synthetic(bug="scale"), max_examples=3)) == {**DEFAULTS, "sink_weights": "n/a"}
    assert detect(synthetic(bug="leak"), max_examples=3)["nonfinite"] == "propagates"


def test_detect_reports_paths_that_disagree():
    """Bool masks give NaN rows, additive masks the output bias: no convention, "inconsistent"."""
    def build(weights):
        nan, bias = attention_fn(weights, empty_row="nan"), attention_fn(weights)

        def fn(q, k, v, *, mask=None, **kw):
            use = nan if mask is not None and np.asarray(mask).dtype == bool else bias
            return use(q, k, v, mask=mask, **kw)

        return fn

    found = detect(Adapter("two-paths", {"cross", "bias", "mask", "additive_mask"}, build), max_examples=2)
    assert found["empty_row"] == "inconsistent"
    assert "nan: Probe(" in found.examples["empty_row"] and "output_bias: Probe(" in found.examples["empty_row"]
    assert "bool mask" in found.examples["empty_row"] and "additive -inf mask" in found.examples["empty_row"]


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_our_backends_detect_as_the_defaults(backend):
    if backend == "mlx" and not HAS_MLX:
        pytest.skip("MLX is not installed")
    adapter = BackendAdapter(backend)
    found = detect(adapter, max_examples=4)
    assert "sinks" in adapter.features
    assert dict(found) == DEFAULTS and not found.examples


def test_detect_rejects_bad_max_examples():
    with pytest.raises(ValueError, match="max_examples must be a positive int"):
        detect(synthetic(), max_examples=0)
