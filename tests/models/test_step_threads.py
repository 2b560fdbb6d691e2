"""The BLAS threads of a numpy decoder's forward pass (mha.models): a decode step (one token per sequence)
runs with BLAS at mha_cpu.options.step_blas_threads, any longer pass with BLAS's own setting; a rule on
the call's shape and the settings, and either way the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

import mha_cpu


def _blas_threads() -> list:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def _record_threads(model, monkeypatch) -> list:
    """Each forward pass's (tokens, BLAS threads seen inside it)."""
    seen, inner = [], model._forward

    def spy(ids, *args, **kwargs):
        seen.append((ids.shape[1], _blas_threads()))
        return inner(ids, *args, **kwargs)

    monkeypatch.setattr(model, "_forward", spy)
    return seen


@pytest.mark.parametrize("setting", [1, None])
def test_decode_steps_take_the_setting_and_prefills_blas_own(zoo, monkeypatch, setting):
    from threadpoolctl import threadpool_limits

    import mha.models as mm

    model = mm.load(zoo("llama"), backend="numpy")
    seen = _record_threads(model, monkeypatch)
    with threadpool_limits(2, user_api="blas"):  # BLAS's own setting differs from the default
        if not _blas_threads():
            pytest.skip("no BLAS library that threadpoolctl controls")
        with mha_cpu.options.override(step_blas_threads=setting):
            model.generate(np.arange(3, 12), 4, stop_at_eos=False)
        assert _blas_threads() == [2] * len(_blas_threads())  # given back after every step
    prefill, steps = seen[0], seen[1:]
    assert prefill[0] > 1 and set(prefill[1]) == {2}
    assert len(steps) >= 3 and all(t == 1 for t, _ in steps)
    want = 2 if setting is None else setting
    assert all(set(threads) == {want} for _, threads in steps), steps


def test_a_steps_setting_governs_its_attention_layers(zoo, monkeypatch):
    """Inside a decode step the layers' projections run at step_blas_threads, not at the layer's own
    blas_threads (the step holds BLAS for all of its work); outside a step the layer's setting holds."""
    from threadpoolctl import threadpool_limits

    import mha.models as mm
    from mha_cpu import _workers

    model = mm.load(zoo("llama"), backend="numpy")
    seen, inner = [], _workers.Workers.linear

    def spy(self, x, *args):
        seen.append((x.shape[-2], _blas_threads()))
        return inner(self, x, *args)

    monkeypatch.setattr(_workers.Workers, "linear", spy)
    with threadpool_limits(1, user_api="blas"):
        if not _blas_threads():
            pytest.skip("no BLAS library that threadpoolctl controls")
        with mha_cpu.options.override(step_blas_threads=2, blas_threads=1):
            model.generate(np.arange(3, 12), 3, stop_at_eos=False)
            steps = [t for rows, t in seen if rows == 1]
            assert len(steps) >= 2 * 2 * len(model.layers) and all(set(t) == {2} for t in steps), seen
            seen.clear()
            model.layers[0](np.ones((1, 1, model.config.hidden_size), np.float32))  # a layer call of its own
            assert seen and all(set(t) == {1} for _, t in seen), seen
        assert _blas_threads() == [1] * len(_blas_threads())


def test_a_blas_loaded_after_the_first_step_is_limited_too(zoo, monkeypatch):
    """The step's limit finds the BLAS libraries again after an import (torch brings its own OpenBLAS):
    here the remembered list is made stale, as if the library had been loaded since."""
    from threadpoolctl import threadpool_limits

    import mha.models as mm
    from mha_cpu import _workers

    model = mm.load(zoo("llama"), backend="numpy")
    seen = _record_threads(model, monkeypatch)
    with threadpool_limits(2, user_api="blas"):
        if not _blas_threads():
            pytest.skip("no BLAS library that threadpoolctl controls")
        monkeypatch.setitem(_workers._state, "blas", [])  # what a scan before the library came would hold
        monkeypatch.setitem(_workers._state, "modules", -1)  # ... and sys.modules has changed since
        with mha_cpu.options.override(step_blas_threads=1):
            model.generate(np.arange(3, 12), 3, stop_at_eos=False)
        assert _blas_threads() == [2] * len(_blas_threads())
    assert all(set(threads) == {1} for t, threads in seen[1:]), seen


def test_both_settings_generate_the_same_numbers(zoo):
    import mha.models as mm

    model = mm.load(zoo("llama"), backend="numpy")
    runs = []
    for setting in (1, None):
        with mha_cpu.options.override(step_blas_threads=setting):
            out = model.generate(np.arange(3, 30), 6, attentions=True, stop_at_eos=False)
        runs.append((out.ids, out.attentions))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_the_setting_is_checked():
    with pytest.raises((TypeError, ValueError), match="step_blas_threads"), mha_cpu.options.override(step_blas_threads=0):
        pass  # (never reached: the override refuses 0; were it taken, the with would give it back)
