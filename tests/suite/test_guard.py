"""The suite cannot be fooled or hung (issue 29): every answer of an implementation is checked (shape, real
float dtype, finite where the inputs promise it) with "<impl> returned X, expected (B, T, E) real float", every
call has a deadline, and an adapter's declarations are checked before anything runs."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from mha.testing import ImplementationError, check, detect, run_property
from mha.testing.adapters import Adapter, BackendAdapter
from mha.testing.properties import PROPERTIES

from tests.suite.synthetic_attention import FEATURES, broken, synthetic

# Some of the 17 properties that passed an all-NaN answer before answers were checked (main, 2026-12-06).
PASSED_NAN = ["masked_keys_irrelevant", "mask_algebra", "causal_prefix", "default_scale"]


def _applicable(adapter) -> list[str]:
    return [n for n, p in PROPERTIES.items() if not p.not_applicable(adapter.features, {})]


@pytest.mark.parametrize("kind, message", [
    ("complex", r"broken-complex returned complex\d+ array of shape \((\d+), (\d+), (\d+)\) as its output, "
                r"expected \(\1, \2, \3\) real float"),
    ("none", r"broken-none returned None (as its output|for return_weights=True, expected a pair \(output, weights\))"),
    ("scalar", r"broken-scalar returned float 1\.5 (as its output|for return_weights=True, expected a pair)"),
    ("shape", r"broken-shape returned float32 array of shape \(\d+, 1, \d+\) as its output, expected \(\d+, \d+, "
              r"\d+\) real float"),
])
def test_a_malformed_answer_fails_every_property_saying_what_came_back(kind, message):
    adapter = broken(kind)
    t = time.perf_counter()
    report = check(adapter, max_examples=10)
    assert report.failed == _applicable(adapter) and len(report.failed) >= 24
    for name, _, detail in report.results:
        if name in report.failed:
            assert re.match(message, detail), (name, detail)
            assert "falsifying example: Problem(" in detail
    assert time.perf_counter() - t < 20  # the first malformed answer ends a property: no shrinking


def test_weights_asked_for_must_come_as_a_pair():
    with pytest.raises(ImplementationError, match=r"broken-pair returned float32 array .* for return_weights=True, "
                                                  r"expected a pair \(output, weights\)|broken-pair returned numpy"):
        run_property(broken("pair"), "weights_contract", max_examples=5)


def test_nan_answers_fail_the_properties_they_used_to_pass():
    report = check(broken("nan"), properties=PASSED_NAN, max_examples=5)
    assert report.failed == PASSED_NAN
    for _, _, detail in report.results:
        assert "broken-nan returned np.float32(nan) at (0, 0, 0) of its output" in detail, detail
        assert "for finite inputs whose answer is finite there; expected (" in detail


@pytest.mark.slow
def test_nan_answers_fail_every_property():
    adapter = broken("nan")
    assert check(adapter, max_examples=10).failed == _applicable(adapter)


def test_nan_where_the_conventions_allow_it_passes():
    """The check follows the declared conventions: NaN on rows that see no key is the "nan" convention."""
    report = check(synthetic("nan-rows", empty_row="nan"), properties=["reference", "empty_rows_output_bias",
                                                                      "masked_keys_irrelevant"], max_examples=20)
    assert report.failed == [], report


def test_a_hung_implementation_fails_fast_and_is_not_called_again():
    t = time.perf_counter()
    report = check(broken("hang"), properties=["reference", "causal_prefix", "mask_algebra"], timeout=0.5)
    assert time.perf_counter() - t < 5
    (_, s1, d1), (_, s2, d2), (_, s3, d3) = report.results
    assert (s1, s2, s3) == ("fail", "fail", "fail")
    assert d1.startswith("broken-hang gave no answer in 0.5 s (a call); its call is left running on a daemon "
                         "thread and broken-hang is not called again in this process; falsifying example: Problem(")
    assert d2.startswith("not called: broken-hang gave no answer in 0.5 s") and d3 == d2


def test_a_hung_implementation_in_the_pytest_plugin(tmp_path):
    from tests.suite.test_suite_tools import _pytest

    t = time.perf_counter()
    res = _pytest("--mha-impl", "tests.suite.synthetic_attention:hanging", "--mha-timeout", "0.5", "-k",
                  "reference or causal_prefix", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "2 failed" in res.stdout and "gave no answer in 0.5 s" in res.stdout and "not called:" in res.stdout
    assert time.perf_counter() - t < 60
    res = _pytest("--mha-impl", "tests.suite.synthetic_attention:hanging", "--mha-timeout", "0", cwd=tmp_path)
    assert res.returncode == 4 and "--mha-timeout must be a positive number of seconds, got 0.0" in res.stderr


def test_the_deadline_is_checked_and_can_be_off():
    with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds or None, got 0"):
        check(synthetic(), timeout=0)
    assert check(synthetic(), properties=["reference"], max_examples=3, timeout=None).failed == []


@pytest.mark.parametrize("features, error, message", [
    ("mask,causal", TypeError, r"s\.features must be a set of feature names such as \{'mask', 'causal'\}, got str "
                               r"'mask,causal'"),
    (None, TypeError, r"got NoneType None"),
    ({"mask", 3}, TypeError, r"s\.features must hold str, got 3"),
    ({"mask", "causals"}, ValueError, r"s\.features: unknown features \['causals'\]"),
])
def test_declared_features_are_checked(features, error, message):
    class Plain:
        name = "s"
        build = staticmethod(lambda weights: None)
    Plain.features = features
    with pytest.raises(error, match=message):
        check(Plain())
    with pytest.raises(error, match=message):
        detect(Plain())


def test_other_declarations_are_checked():
    good = synthetic()
    for attr, value, message in (("name", "", r"an adapter's name must be a non-empty str"),
                                 ("build", None, r"\.build must be callable"),
                                 ("dtypes", "float32", r"\.dtypes must be a tuple drawn from"),
                                 ("notes", ["x"], r"\.notes must be a dict")):
        bad = synthetic()
        object.__setattr__(bad, attr, value)
        with pytest.raises((TypeError, ValueError), match=message):
            check(bad, properties=["reference"])
    assert check(good, properties=["reference"], max_examples=2).failed == []


def test_detect_says_error_for_a_crash_or_a_broken_answer():
    found = detect(broken("crash"), max_examples=2)
    assert dict(found) == {"causal": "error", "empty_row": "error", "nonfinite": "error", "sink_weights": "n/a"}
    assert found.examples["causal"] == "IndexError: tuple index out of range (a bug inside the implementation)"
    found = detect(broken("complex"), max_examples=2)
    assert set(found.values()) == {"error", "n/a"} and found["sink_weights"] == "n/a"  # no sinks feature: not probed
    assert "returned complex64 array" in found.examples["empty_row"]
    found = detect(broken("hang"), max_examples=2, timeout=0.5)
    assert set(found.values()) == {"error", "n/a"} and "gave no answer in 0.5 s" in found.examples["causal"]
    assert dict(detect(synthetic(), max_examples=2)) == {"causal": "bottom_right", "empty_row": "output_bias",
                                                         "nonfinite": "isolated", "sink_weights": "n/a"}


def test_answers_in_other_array_types_and_layouts_are_read(backend):
    """mx.array, torch tensors and unbatched (T, E) calls are answers like numpy arrays."""
    from mha.testing._guard import guard
    from mha.testing.strategies import Config, random_inputs, random_weights

    cfg = Config(2, 3, 3, 2, 2, 2, 4, 4, True, True)
    rng = np.random.default_rng(0)
    w = random_weights(cfg, rng)
    q, _, _ = random_inputs(cfg, rng)
    native = BackendAdapter(backend)

    def build(weights, **kw):
        import mha

        layer = mha.MultiHeadAttention.from_weights(weights, backend=backend)
        return lambda query, key, value, **kwargs: layer(query, key, value, **kwargs)

    fn = guard(Adapter("native", {"weights"}, build)).build(w)
    y, P = fn(q, q, q, return_weights=True)
    assert y.shape == (2, 3, 4) and P.shape == (2, 2, 3, 3)
    assert fn(q[0], q[0], q[0]).shape == (3, 4)
    np.testing.assert_allclose(fn(q, q, q), native.build(w)(q, q, q), atol=1e-6)
