"""The numpy backend's workers and its reusable per-thread temporaries.

Workers: numpy's elementwise ops are single-threaded but release the GIL, so a call's tasks run on a
thread pool, with BLAS held at one thread meanwhile (threadpoolctl, the ``fast`` extra) so that the two
levels of threading do not fight: OpenBLAS's own threads keep spinning after a multi-threaded GEMM and
would take the cores from the tasks that follow.

Temporaries: a fresh array of a few MiB is not free; glibc hands it back to the kernel when freed, and
the next call takes a page fault for every 4 KiB it touches again (measured: ~1000 faults, ~2 ms of an
11.5 ms call at B=1, T=512, E=512 on a 2-core VM). So temporaries that never leave a call live in
buffers each thread keeps from call to call.

Ownership rule, enforced: each buffer is a :class:`Slot`, a module-level constant of the one module that
uses it. ``with SLOT.lease(shape, dtype) as a:`` lends this thread's buffer for the block; leasing a slot
that the same thread already holds raises RuntimeError, so two uses can never share a buffer by
accident. What a call returns is always a fresh array.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ._options import options, tuning

_POOL_PREFIX = "mha_cpu"
TASKS_PER_WORKER = 4  # what a call is cut into, per worker, so that a slower core holds it up little
_DONE = object()


# -- workers ---------------------------------------------------------------------------------------
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_controller = None


def _cpus() -> int:
    if options.threads is not None:
        return options.threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix=_POOL_PREFIX)
            _pool_size = n
        return _pool


def _blas_controller():
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
        else:
            _controller = ThreadpoolController()
    return _controller


_blas_libs = None


def _libs() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process ([] without it)."""
    global _blas_libs
    if _blas_libs is None:
        controller = _blas_controller()
        _blas_libs = list(controller.select(user_api="blas").lib_controllers) if controller else []
    return _blas_libs


_hold_lock = threading.Lock()
_hold = {"count": 0, "saved": []}


def _set_threads(lib, n: int) -> None:
    """Set one BLAS library's threads from whichever thread holds _hold_lock (threadpoolctl lets only
    one "controlling" thread set OpenBLAS's: take control, set, hand it back)."""
    clear = getattr(lib, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
    lib.set_num_threads(n)
    if clear is not None:
        clear(force=True)


class one_blas_thread:
    """``with one_blas_thread():`` BLAS held at one thread for the block: for a call's own pool (whose
    workers each run GEMMs), and for work on one thread whose GEMMs are too small to share out (a
    multi-threaded BLAS hands even a (1, 512) x (512, 1536) product to its threads, and when the cores
    are busy the calling thread spins waiting for them: measured 3.6 ms of CPU for a decode step of
    0.4 ms). Process-wide, like every BLAS thread setting, so counted: the first holder sets 1, the last
    gives the setting back, whichever threads they run on (two overlapping holders that each saved and
    restored what they found could leave BLAS at one thread for good). Direct calls into the library,
    ~2 us each; threadpoolctl's ``limit()`` takes ~20 us."""

    __slots__ = ()

    def __enter__(self):
        with _hold_lock:
            if _hold["count"] == 0:
                _hold["saved"] = [(lib, n) for lib in _libs() if (n := lib.get_num_threads()) != 1]
                for lib, _ in _hold["saved"]:
                    _set_threads(lib, 1)
            _hold["count"] += 1
        return self

    def __exit__(self, *exc):
        with _hold_lock:
            _hold["count"] -= 1
            if _hold["count"] == 0:
                for lib, n in _hold["saved"]:
                    _set_threads(lib, n)
                _hold["saved"] = []


def on_worker() -> bool:
    """Whether this thread is one of the pool's workers."""
    return threading.current_thread().name.startswith(_POOL_PREFIX)


class Workers:
    """The workers of one call: ``with Workers(flops) as workers: workers.map(fn, items)``.

    With more than one worker, BLAS is held at one thread for the whole call and every GEMM and task
    runs on the pool. Without threadpoolctl, for small work (below ``tuning.min_parallel_flops``), or
    from inside a worker, everything runs on the calling thread (BLAS's threads then as the caller
    chooses: see :class:`BlasChoice`).
    """

    def __init__(self, flops: float, threads: int | None = None):
        n = threads or (_cpus() if flops >= tuning.min_parallel_flops and not on_worker() else 1)
        self.n = n if n > 1 and _blas_controller() else 1
        self._hold = None

    def __enter__(self):
        if self.n > 1:
            self._hold = one_blas_thread().__enter__()
        return self

    def __exit__(self, *exc):
        if self._hold is not None:
            self._hold.__exit__(*exc)
            self._hold = None

    def map(self, fn, items) -> None:
        """Run ``fn`` on every item, the workers taking the next item whenever they are free (in the order
        given: put the costliest first). Taken, not dealt: the cores of a VM need not run at one speed
        (measured on this project's 2-core CI VM: one core's sgemm at 92 GFLOP/s, the other's at 134), and
        an even deal waits for the slowest. The calling thread takes part: one hand-off fewer (an empty
        map over 2 workers took 66 us when every share went to the pool, 20 us so)."""
        items = list(items)
        if self.n <= 1 or len(items) <= 1 or on_worker():  # waiting on the pool from a worker could deadlock
            for it in items:
                fn(it)
            return
        queue, lock, failed = iter(items), threading.Lock(), []

        def work():
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # thread-local state
                while not failed:
                    with lock:
                        it = next(queue, _DONE)
                    if it is _DONE:
                        return
                    try:
                        fn(it)
                    except BaseException:
                        failed.append(True)  # the others stop taking items
                        raise

        pending = [_executor(self.n - 1).submit(work) for _ in range(min(self.n, len(items)) - 1)]
        try:
            work()
        finally:  # never return (or raise) while workers still write into the caller's buffers: wait for
            for f in pending:  # all of them before any result() re-raises a worker's error (one still
                f.cancel()  # queued behind another call's tasks has nothing left to take: dropped)
            wait(pending)
        for f in pending:
            if not f.cancelled():
                f.result()

    def linear(self, x, weight_t, bias, out):
        """``out[...] = x @ weight_t + bias`` for x (..., in) and weight_t (in, out), in tiles of rows and
        columns shared out over the workers (about four per worker, as tasks are; tiles of at least
        ``tuning.tile_rows`` rows and ``tile_cols`` columns, 256 and 64, below which the GEMMs lose
        speed); returns out (..., out_features)."""
        if not out.flags.c_contiguous:  # a reshape would copy, and the results would be lost
            raise ValueError("Workers.linear: out must be C-contiguous")
        x2 = x.reshape(-1, x.shape[-1])
        o2 = out.reshape(x2.shape[0], weight_t.shape[1])
        (M, N), parts = o2.shape, 1 if self.n <= 1 else TASKS_PER_WORKER * self.n
        if M == 0 or N == 0:
            return out
        pr = max(1, min(parts, M // tuning.tile_rows))
        pc = max(1, min(-(-parts // pr), N // tuning.tile_cols))
        a = tuning.tile_align
        rs, cs = -(-M // pr), -(-(-(-N // pc)) // a) * a

        def part(tile):
            r0, c0 = tile
            o = o2[r0:r0 + rs, c0:c0 + cs]
            np.matmul(x2[r0:r0 + rs], weight_t[:, c0:c0 + cs], out=o)
            if bias is not None:
                o += bias[c0:c0 + cs]

        self.map(part, [(r0, c0) for r0 in range(0, M, rs) for c0 in range(0, N, cs)])
        return out


# -- BLAS's threads for work on one thread ----------------------------------------------------------
class BlasChoice:
    """Whether a kind of call on one thread (a layer's decode steps, or its calls too small for the
    pool) holds BLAS at one thread, learnt from the calls' own times per unit of work.

    BLAS's threads share a decode step's GEMVs well on idle cores (OpenBLAS's threads spin between
    calls, so a hand-off costs little; measured 348 vs 476 us per step at E=512, context 128), and badly
    when other work holds the cores (810 vs 540 us, 3.7 vs 1.6 ms at context 4096, with one core busy
    elsewhere): the threads then spin against it. Neither choice wins everywhere, so each layer keeps a
    running mean of its times (per unit of work: FLOPs for small calls, whose shapes vary) under each,
    takes the faster, tries the other now and then (every other call of the first 8, then one in 32)
    and switches when it is 15% faster. Both give the same bits with OpenBLAS (it splits a product's
    outputs over its threads, not its sums). Races between threads only blur the means."""

    __slots__ = ("calls", "mean", "held")

    def __init__(self):
        self.calls, self.mean, self.held = 0, {True: None, False: None}, True

    def pick(self) -> bool:
        """True: hold BLAS at one thread for this call."""
        self.calls += 1
        explore = self.calls % 32 == 0 or (self.calls <= 8 and self.calls % 2 == 0)
        return self.held != explore

    def record(self, held: bool, seconds: float) -> None:
        m = self.mean[held]
        self.mean[held] = seconds if m is None else m + (0.3 if held != self.held else 0.1) * (seconds - m)
        other, mine = self.mean[not self.held], self.mean[self.held]
        if other is not None and mine is not None and other < 0.85 * mine:
            self.held = not self.held


def timed(choice: BlasChoice, work: float, fn, *args):
    """fn(*args) with BLAS held at one thread or not, as ``choice`` picks, its time per ``work`` recorded
    for it (results that hand back, None, are not)."""
    held = choice.pick()
    t0 = time.perf_counter()
    with one_blas_thread() if held else contextlib.nullcontext():
        found = fn(*args)
    if found is not None:
        choice.record(held, (time.perf_counter() - t0) / max(work, 1.0))
    return found


# -- per-thread temporaries --------------------------------------------------------------------------
class _Buffers(dict):
    """One thread's buffers: Slot -> bytes, and the slots it holds now (hashable by identity, so that a
    WeakSet can list every thread's)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__

    def __init__(self):
        super().__init__()
        self.held = set()


_registry_lock = threading.Lock()
_registry: weakref.WeakSet = weakref.WeakSet()
_local = threading.local()


def _buffers() -> _Buffers:
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = _Buffers()
        with _registry_lock:
            _registry.add(bufs)
    return bufs


class Slot:
    """One reusable temporary per thread (see the module docstring): ``with SLOT.lease(shape, dtype)``."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"

    def lease(self, shape, dtype) -> "_Lease":
        """An uninitialised (shape) array of ``dtype`` for the ``with`` block: this thread's buffer when
        its size is within [tuning.scratch_min, options.scratch_bytes], else a fresh array."""
        return _Lease(self, shape, np.dtype(dtype))


class _Lease:
    __slots__ = ("slot", "shape", "dtype", "_bufs")

    def __init__(self, slot, shape, dtype):
        self.slot, self.shape, self.dtype, self._bufs = slot, shape, dtype, None

    def __enter__(self) -> np.ndarray:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        if n > options.scratch_bytes or n < tuning.scratch_min:
            return np.empty(self.shape, self.dtype)
        bufs = _buffers()
        if self.slot in bufs.held:
            raise RuntimeError(f"scratch {self.slot} is already leased on this thread: two uses of one "
                               f"buffer (each use needs a Slot of its own)")
        buf = bufs.get(self.slot)
        if buf is None or buf.nbytes < n:
            buf = bufs[self.slot] = np.empty(max(n, 1), np.uint8)
        bufs.held.add(self.slot)
        self._bufs = bufs
        return buf[:n].view(self.dtype).reshape(self.shape)

    def __exit__(self, *exc):
        if self._bufs is not None:
            self._bufs.held.discard(self.slot)
            self._bufs = None


def free_scratch() -> None:
    """Drop every thread's reusable temporaries (call it while no layer call is running)."""
    with _registry_lock:
        for bufs in list(_registry):
            bufs.clear()
