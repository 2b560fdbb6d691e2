"""The zoo of peers (mha.testing.zoo): each adapter runs, is detected as following what it declares
(or "inconsistent" where its paths disagree), and a planted bug in a peer still fails under its
declared conventions. Small: few probes and examples, small shapes; the whole table is a command
(python -m mha.testing.conformance), not a test."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from mha.testing import check, detect, zoo
from mha.testing.conventions import DEFAULTS, conventions_of

# what `mha check --detect` finds for each peer (torch 2.13, MLX 0.32.4, Keras 3.15.1 numpy backend,
# Flax 0.12.8 on JAX CPU, transformers 5.18)
DETECTED = {
    "torch-mha-fast": {"causal": "n/a", "empty_row": "inconsistent", "nonfinite": "propagates"},
    "torch-mha-weights": {"causal": "n/a", "empty_row": "nan", "nonfinite": "propagates"},
    "torch-sdpa": {"causal": "top_left", "empty_row": "output_bias", "nonfinite": "propagates"},
    "mlx-nn-mha": {"causal": "n/a", "empty_row": "inconsistent", "nonfinite": "propagates"},
    "mlx-fast-sdpa": {"causal": "bottom_right", "empty_row": "inconsistent", "nonfinite": "propagates"},
    "keras-mha": {"causal": "top_left", "empty_row": "inconsistent", "nonfinite": "propagates"},
    "flax-nnx-mha": {"causal": "top_left", "empty_row": "mean_value", "nonfinite": "propagates"},
    "hf-bert-eager": {"causal": "n/a", "empty_row": "mean_value", "nonfinite": "propagates"},
    "hf-bert-sdpa": {"causal": "n/a", "empty_row": "output_bias", "nonfinite": "propagates"},
    "hf-llama-eager": {"causal": "n/a", "empty_row": "mean_value", "nonfinite": "propagates"},
    "hf-llama-sdpa": {"causal": "n/a", "empty_row": "output_bias", "nonfinite": "propagates"},
}
for _found in DETECTED.values():  # no peer has learned sinks (gpt-oss's): nothing to detect
    _found["sink_weights"] = "n/a"
PROBES = {"flax-nnx-mha": 1}  # JAX compiles every new shape (seconds each)


def _needs(name):
    if importlib.util.find_spec(zoo.requirement(name)) is None:
        pytest.skip(f"{name} needs {zoo.requirement(name)}")


def test_the_zoo_is_listed_and_unknown_names_are_refused():
    assert set(DETECTED) == set(zoo.ZOO)
    with pytest.raises(ValueError, match="unknown zoo implementation 'nope'"):
        zoo.adapter("nope")


@pytest.mark.parametrize("name", list(DETECTED))
def test_detected_conventions(name):
    _needs(name)
    adapter = zoo.adapter(name)
    found = detect(adapter, max_examples=PROBES.get(name, 2))
    assert dict(found) == DETECTED[name], found.examples
    declared = conventions_of(adapter)
    for key, value in found.items():  # a peer declares what it follows wherever it follows one
        if value not in ("inconsistent", "n/a"):
            assert declared[key] == value, (key, declared[key], value)


def test_torch_weights_path_passes_where_its_convention_used_to_fail():
    """torch's weights path returns NaN for a query that sees no key: declared, that is a convention."""
    _needs("torch-mha-weights")
    report = check(zoo.adapter("torch-mha-weights"),
                   properties=["reference", "empty_rows_output_bias", "weights_contract", "value_bias_affinity"],
                   max_examples=10)
    assert not report.failed, str(report)


def test_torch_fast_path_inconsistency_is_a_failure():
    """Self-attention through the native fused kernel gives NaN rows where the SDPA path gives the
    output bias: the adapter reaches both, and the property declared for the fast path fails."""
    _needs("torch-mha-fast")
    from mha.testing.strategies import Config, random_inputs, random_weights

    cfg = Config(2, 3, 3, 2, 2, 2, 4, 4, True, True)
    rng = np.random.default_rng(0)
    w = random_weights(cfg, rng)
    x, _, _ = random_inputs(cfg, rng)
    keep = np.ones((3, 3), bool)
    keep[1] = False  # query 1 sees no key
    fn = zoo.adapter("torch-mha-fast").build(w)
    assert np.isnan(fn(x, x, x, mask=keep)[:, 1]).all()  # fused native kernel
    assert np.array_equal(fn(x, x.copy(), x.copy(), mask=keep)[:, 1], np.broadcast_to(w.o_bias, (2, 4)))  # SDPA
    report = check(zoo.adapter("torch-mha-fast"), properties=["empty_rows_output_bias"], max_examples=60)
    assert report.failed == ["empty_rows_output_bias"]


def _sdpa_variant(**changes):
    from mha.testing.zoo.torch_peers import TorchSDPA

    class Planted(TorchSDPA):
        name = "torch-sdpa-planted"
        conventions = dict(TorchSDPA.conventions, **changes.get("conventions", {}))

        def build(self, weights, scale=None, dtype="float32"):
            if changes.get("scale_bug"):
                scale = 2.0 / np.sqrt(weights.head_dim) if scale is None else 2.0 * scale
            return super().build(weights, scale=scale, dtype=dtype)

    return Planted()


@pytest.mark.parametrize("changes, must_fail", [
    ({"scale_bug": True}, "reference"),
    ({"conventions": {"causal": "bottom_right"}}, "causal_decoding"),  # top-left causal declared bottom-right
    ({"conventions": {"nonfinite": "isolated"}}, "nonfinite_hidden_isolation"),  # NaN leak declared isolated
])
def test_planted_bugs_in_a_peer_fail(changes, must_fail):
    _needs("torch-sdpa")
    assert not check(_sdpa_variant(), properties=[must_fail], max_examples=10).failed
    report = check(_sdpa_variant(**changes), properties=[must_fail], max_examples=10)
    assert report.failed == [must_fail], str(report)


@pytest.mark.parametrize("name", ["keras-mha", "flax-nnx-mha", "hf-llama-eager"])
def test_peer_weights_are_loaded_as_the_suite_gives_them(name):
    """One problem against the float64 oracle: the peer's own layer holds the suite's weights."""
    _needs(name)
    from mha.testing import oracle, tolerance
    from mha.testing.strategies import Config, random_inputs, random_weights

    adapter = zoo.adapter(name)
    cfg = Config(2, 3, 3, 2, 2, 3, 6, 6, True, True)
    rng = np.random.default_rng(3)
    w = random_weights(cfg, rng)
    x, _, _ = random_inputs(cfg, rng)
    y = np.asarray(adapter.build(w)(x, x, x), np.float64)
    y_ref, _ = oracle.attention(w, x)
    assert np.abs(y - y_ref).max() <= tolerance.t1("float32", tolerance.magnitude(w, x, y_ref=y_ref))
    assert DEFAULTS.keys() == conventions_of(adapter).keys()
