"""The decode steps' BLAS-thread choice (mha.models._threads): learnt from the steps' times in bursts,
either way giving the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from mha.models import _threads


@pytest.mark.parametrize("held_cost,free_cost,want_held", [(10.0, 5.0, False), (5.0, 80.0, True)])
def test_the_faster_mode_wins_and_the_first_step_of_a_burst_is_not_counted(monkeypatch, held_cost, free_cost,
                                                                           want_held):
    from threadpoolctl import threadpool_limits

    clock = [0.0]
    choice = _threads.StepThreads()
    monkeypatch.setattr(_threads.time, "perf_counter", lambda: clock[0])
    seen = []
    with threadpool_limits(2, user_api="blas"):  # "free" must differ from held, even on a 1-CPU machine
        _steps(choice, clock, seen, held_cost, free_cost)
    assert choice.held is want_held
    assert seen[:16] == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4
    assert seen[_threads.EVERY:_threads.EVERY + _threads.BURST] == [not want_held] * _threads.BURST  # exploration
    assert seen[_threads.EVERY + _threads.BURST:_threads.EVERY + 40] == [want_held] * (40 - _threads.BURST)


def _steps(choice, clock, seen, held_cost, free_cost):
    from threadpoolctl import threadpool_info

    for n in range(3 * _threads.EVERY):
        with choice.step():
            held = all(lib["num_threads"] == 1 for lib in threadpool_info() if lib["user_api"] == "blas")
            seen.append(held)
            first = n % _threads.BURST == 0 if n < 4 * _threads.BURST else n % _threads.EVERY in (0, _threads.BURST)
            clock[0] += 1000.0 if first else (held_cost if held else free_cost)  # a burst's first step: an outlier


def test_both_modes_generate_the_same_numbers(zoo):
    import mha.models as mm

    model = mm.load(zoo("llama"), backend="numpy")
    runs = []
    for held in (True, False):
        model._threads.steps, model._threads.held = 10 * _threads.EVERY + _threads.BURST + 1, held
        out = model.generate(np.arange(3, 30), 6, attentions=True, stop_at_eos=False)
        runs.append((out.ids, out.attentions))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
