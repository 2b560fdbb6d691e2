"""The numpy backend's threads, by library: a call's tasks run on a ``concurrent.futures`` thread pool (numpy releases
the GIL in its loops and BLAS) with BLAS held at one thread by threadpoolctl, so that the two levels do not fight; a
call on the calling thread alone holds BLAS at ``options.blas_threads``. The calling thread sets and restores the
limit (OpenBLAS obeys one controlling thread: overlapping calls from several threads may run at BLAS's own setting)."""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
from threadpoolctl import CONTROLLING_THREAD_OWNERSHIP, ThreadpoolController

from ._options import options, thresholds

_PREFIX = "mha_cpu"
TASKS_PER_WORKER = 4  # what a call is cut into, per worker, so that a slower core holds it up little
_state = {"pool": None, "size": 0, "blas": None, "modules": -1}
_lock = threading.Lock()
_local = threading.local()  # per thread: the Workers block it is in, whether it runs a task


class blas_threads:
    """``with blas_threads(n):`` BLAS at n threads (threadpoolctl's limit, its libraries scanned again only when
``sys.modules`` changed size); this thread then holds BLAS for the layer's calls in it (:class:`Workers`)."""

    __slots__ = ("n", "saved", "outer")

    def __init__(self, n: int):
        self.n, self.saved, self.outer = n, (), None

    def __enter__(self):
        if _state["blas"] is None or _state["modules"] != len(sys.modules):  # a library may have come since
            _state["blas"] = ThreadpoolController().select(user_api="blas").lib_controllers
            _state["modules"] = len(sys.modules)
        self.saved = [(lib, m) for lib in _state["blas"] if (m := lib.get_num_threads()) != self.n]
        CONTROLLING_THREAD_OWNERSHIP.increment()
        for lib, _ in self.saved:
            lib.set_num_threads(self.n)
        self.outer, _local.blas = getattr(_local, "blas", None), self.n
        return self

    def __exit__(self, *exc):
        _local.blas = self.outer
        for lib, m in self.saved:
            lib.set_num_threads(m)
        CONTROLLING_THREAD_OWNERSHIP.decrement()


def cpus() -> int:
    """Worker threads for a large call: ``options.threads``, else the CPUs this process may use."""
    if options.threads is not None:
        return options.threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def on_worker() -> bool:
    """Whether this thread runs a task of the pool: one of its workers, or a caller taking part in a map."""
    found = getattr(_local, "on_worker", None)
    if found is None:
        found = _local.on_worker = threading.current_thread().name.startswith(_PREFIX)
    return found or getattr(_local, "mapping", False)


class Workers:
    """The workers of one call: ``with Workers(flops) as workers: workers.map(fn, items)``: the pool for
    ``options.parallel_flops`` of work or more (BLAS at one thread), else the calling thread alone (BLAS at
    ``options.blas_threads``, or as a :class:`blas_threads` block of this thread holds it); one thread in a
    task. Inside another Workers block of the same thread (the core within a layer call), the outer one holds."""

    def __init__(self, flops: float):
        outer = getattr(_local, "workers", None)
        self.n = 1 if on_worker() else outer.n if outer is not None else 1 if flops < options.parallel_flops else cpus()
        self._limit = None

    def __enter__(self):
        if getattr(_local, "workers", None) is None and not on_worker():
            blas = 1 if self.n > 1 else None if getattr(_local, "blas", None) else options.blas_threads
            self._limit = None if blas is None else blas_threads(blas).__enter__()
            _local.workers = self
        return self

    def __exit__(self, *exc):
        if getattr(_local, "workers", None) is self:
            _local.workers = None
            if self._limit is not None:
                self._limit.__exit__(*exc)

    def map(self, fn, items) -> None:
        """Run ``fn`` on every item, the workers taking the next item whenever they are free (in the order
        given: put the costliest first), the calling thread among them; a task's error is raised once every
        running task has ended, and no task starts after it."""
        items = list(items)
        if self.n <= 1 or len(items) <= 1:
            for it in items:
                fn(it)
            return
        queue, lock, failed = iter(items), threading.Lock(), []

        def work():
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # thread-local state
                while not failed:
                    with lock:
                        it = next(queue, None)
                    if it is None:
                        return
                    try:
                        fn(it)
                    except BaseException:
                        failed.append(True)  # the others stop taking items
                        raise

        with _lock:
            if _state["pool"] is None or _state["size"] != self.n - 1:
                _state["pool"] = ThreadPoolExecutor(max_workers=self.n - 1, thread_name_prefix=_PREFIX)
                _state["size"] = self.n - 1
        pending = [_state["pool"].submit(work) for _ in range(min(self.n, len(items)) - 1)]
        _local.mapping = True  # a Workers made inside a task stays on this thread, as on a worker
        try:
            work()
        finally:  # never return while workers still write into the caller's buffers
            _local.mapping = False
            wait(pending)
        for f in pending:
            f.result()

    def linear(self, x, weight_t, bias, out):
        """``out[...] = x @ weight_t + bias`` for x (..., in) and weight_t (in, out), in tiles of rows and
        columns shared out over the workers (about four per worker; tiles of at least
        ``thresholds.tile_rows`` rows and ``tile_cols`` columns); returns out (..., out_features)."""
        x2 = x.reshape(-1, x.shape[-1])
        o2 = out.reshape(x2.shape[0], weight_t.shape[1])  # out is C-contiguous: a view
        (M, N), t = o2.shape, thresholds
        if self.n == 1 or M == 0 or N == 0:
            np.matmul(x2, weight_t, out=o2)
            if bias is not None:
                o2 += bias
            return out
        pr = max(1, min(TASKS_PER_WORKER * self.n, M // t.tile_rows))
        pc = max(1, min(-(-TASKS_PER_WORKER * self.n // pr), N // t.tile_cols))
        rs, cs = -(-M // pr), -(-(-(-N // pc)) // t.tile_align) * t.tile_align

        def part(tile):
            r0, c0 = tile
            o = o2[r0:r0 + rs, c0:c0 + cs]
            np.matmul(x2[r0:r0 + rs], weight_t[:, c0:c0 + cs], out=o)
            if bias is not None:
                o += bias[c0:c0 + cs]

        self.map(part, [(r0, c0) for r0 in range(0, M, rs) for c0 in range(0, N, cs)])
        return out
