"""BLAS threads for a decoder's decode steps on the numpy backend: one thread or all, learnt in bursts.

A decode step is a chain of matrix-vector products (the layers' projections and MLPs, the LM head)
read from memory once each. On idle cores BLAS's threads share them (measured: 7.1 vs 10.1 ms a step
for the benchmark's Llama-shaped model); when another process holds a core, each product waits for a
descheduled thread and the step takes 20-70 ms, where one thread keeps 10 ms. So each model learns,
per process, which is faster, from the steps' own times.

The choice is learnt in bursts of :data:`BURST` consecutive steps per mode, the first step of each
burst not counted: a mode entered after a long spell of the other pays once for waking BLAS's threads
(or letting them sleep), which is not what a spell of it costs. Exploration: the first bursts
alternate; then one burst of the other mode every :data:`EVERY` steps; the faster median of each
mode's last :data:`KEEP` counted steps wins. One thread is set by threadpoolctl's ``limit`` for the
step and restored after it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque

BURST = 4
EVERY = 256
KEEP = 12
_controller = []


def _blas():
    """threadpoolctl's controller of the BLAS libraries in this process (made once)."""
    if not _controller:
        from threadpoolctl import ThreadpoolController

        _controller.append(ThreadpoolController().select(user_api="blas"))
    return _controller[0]


class StepThreads:
    """``with choice.step():`` runs one decode step under the chosen BLAS threading (see the module)."""

    def __init__(self):
        self.steps = 0
        self.times = {True: deque(maxlen=KEEP), False: deque(maxlen=KEEP)}  # held (one thread): seconds
        self.held = True

    def _mode(self) -> tuple[bool, bool]:
        """(held, counted) for the next step."""
        n = self.steps
        if n < 4 * BURST:  # alternate bursts while learning: held, free, held, free
            return (n // BURST) % 2 == 0, n % BURST != 0
        k = n % EVERY
        if k < BURST:  # a burst of the other mode
            return not self.held, k != 0
        return self.held, k != BURST  # the first step back is not counted either

    @contextlib.contextmanager
    def step(self):
        held, counted = self._mode()
        self.steps += 1
        t0 = time.perf_counter()
        with _blas().limit(limits=1) if held else contextlib.nullcontext():
            yield
        if counted:
            self.times[held].append(time.perf_counter() - t0)
            a, b = self.times[True], self.times[False]
            if len(a) >= 2 and len(b) >= 2:
                self.held = statistics.median(a) <= statistics.median(b)
