"""Calling an implementation under guard: its declarations checked once, a deadline on every call, and
every answer checked before a property looks at it.

Every call the suite makes (``impl.build``, ``fn(...)``, ``fn.init_cache``) runs on a worker thread and
must answer within ``timeout`` seconds. A Python thread cannot be killed: a call that gives no answer is
left running on its (daemon) thread, which ends with the process, and the implementation is never
called again in this process: later properties fail at once, "not called: ... gave no answer in N s".
``timeout=None`` calls in the caller's thread, without a deadline.

Every answer must be what the adapter protocol says: the output a real floating array of shape
(B, T, E) (E the layer's embed_dim, (T, E) for an unbatched query), with ``return_weights`` a pair
(output, weights) whose weights are (B, H, T, S). When every input is finite and the output's bound
``|b_O| + ||W_O||_inf max_j (|v_j| |W_v|^T + |b_v|)_inf`` (times the largest head-mask multiplier)
is well within the dtype, the answer must also be finite on every row the declared conventions make
finite (all of them, or under empty_row "nan"/"unspecified" the rows whose query sees a key in every
head). Anything else fails the property with "<impl> returned X, expected (B, T, E) real float".
"""

from __future__ import annotations

import contextvars
import threading

import numpy as np

from ._answers import Malformed, Unreadable, _describe, check_answer
from .adapters import FEATURES
from .conventions import conventions_of

DEFAULT_TIMEOUT = 60.0
DTYPES = ("float32", "float64", "float16", "bfloat16")


class NoAnswer(BaseException):
    """A call gave no answer within the deadline. A BaseException, so that no property's own checks
    mistake it for a failed assertion; run_property stops at the first one (shrinking would call the
    hung implementation again) and turns it into an :class:`ImplementationError` naming the example."""


# -- declarations ---------------------------------------------------------------------------------------------

def declared_features(impl) -> frozenset:
    """``impl.features`` as a frozenset, checked: a set (or list, tuple) of known feature names. A string
    would be searched by substring ("mask" in "additive_mask"), so it is refused, naming the attribute."""
    name = getattr(impl, "name", type(impl).__name__)
    features = getattr(impl, "features", None)
    if isinstance(features, (str, bytes)) or not isinstance(features, (set, frozenset, list, tuple)):
        raise TypeError(f"{name}.features must be a set of feature names such as {{'mask', 'causal'}}, got "
                        f"{type(features).__name__} {features!r}")
    bad = [f for f in features if not isinstance(f, str)]
    if bad:
        raise TypeError(f"{name}.features must hold str, got {bad[0]!r}")
    unknown = sorted(set(features) - FEATURES)
    if unknown:
        raise ValueError(f"{name}.features: unknown features {unknown}; known: {sorted(FEATURES)}")
    return frozenset(features)


def check_adapter(impl) -> None:
    """Check what an adapter declares (name, features, build, dtypes, notes, conventions) before anything
    runs; TypeError/ValueError naming the attribute."""
    name = getattr(impl, "name", type(impl).__name__)
    if not isinstance(name, str) or not name:
        raise TypeError(f"an adapter's name must be a non-empty str, got {name!r}")
    declared_features(impl)
    if not callable(getattr(impl, "build", None)):
        raise TypeError(f"{name}.build must be callable (weights -> fn), got {getattr(impl, 'build', None)!r}")
    dtypes = getattr(impl, "dtypes", ("float32",))
    if isinstance(dtypes, str) or not isinstance(dtypes, (list, tuple)) or not set(dtypes) <= set(DTYPES):
        raise ValueError(f"{name}.dtypes must be a tuple drawn from {DTYPES}, got {dtypes!r}")
    if not isinstance(getattr(impl, "notes", {}) or {}, dict):
        raise TypeError(f"{name}.notes must be a dict {{feature: why not}}, got {type(impl.notes).__name__}")
    conventions_of(impl)


# -- the deadline ---------------------------------------------------------------------------------------------

_HUNG: dict = {}  # id(impl) -> (impl, message): implementations that gave no answer (kept alive: ids stay theirs)
_local = threading.local()


class _Job:
    def __init__(self, fn, args, kwargs):
        self.context = contextvars.copy_context()  # numpy's errstate and the like follow the call
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Event()
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.context.run(self.fn, *self.args, **self.kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            self.error = err
        self.done.set()


class _Worker:
    """One daemon thread running the calls of one calling thread, one at a time."""

    def __init__(self):
        import queue

        self.jobs = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="mha-testing-call", daemon=True).start()

    def _loop(self):
        while True:
            self.jobs.get().run()


def _call(fn, args, kwargs, timeout):
    """``fn(*args, **kwargs)`` on the calling thread's worker, within ``timeout`` seconds."""
    if timeout is None:
        return fn(*args, **kwargs)
    worker = getattr(_local, "worker", None)
    if worker is None:
        worker = _local.worker = _Worker()
    job = _Job(fn, args, kwargs)
    worker.jobs.put(job)
    if not job.done.wait(timeout):
        _local.worker = None  # that thread is stuck in the call; the next call gets a new one
        raise NoAnswer(timeout)
    if job.error is not None:
        raise job.error
    return job.result


# -- the guarded adapter ---------------------------------------------------------------------------------------

class Guarded:
    """``impl`` seen through the guard: every attribute is ``impl``'s, ``features`` checked, and ``build``
    returns functions whose calls have a deadline and whose answers are checked (module docstring).

    ``finite``: check finiteness where expected ("declared": under the declared conventions; "any": rows
    finite under every convention's visibility, for probing unknown conventions; None: never).
    """

    def __init__(self, impl, timeout=DEFAULT_TIMEOUT, finite="declared"):
        check_adapter(impl)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self._impl = impl
        self.name = getattr(impl, "name", type(impl).__name__)
        self.features = declared_features(impl)
        self.dtypes = tuple(getattr(impl, "dtypes", ("float32",)))
        self.timeout = timeout
        self.finite = finite
        self.declared = conventions_of(impl)

    def __getattr__(self, attr):
        return getattr(self._impl, attr)

    def run(self, fn, args, kwargs, what: str, host: bool = False):
        """Call ``fn`` under the deadline; NoAnswer (and the implementation marked hung) past it. With
        ``host``, MLX arrays in the answer are read into numpy on the thread that computed them (MLX
        streams belong to a thread: another thread cannot evaluate them)."""
        hung = _HUNG.get(id(self._impl))
        if hung is not None:
            raise NoAnswer(f"not called: {hung[1]}")
        if host:
            fn = _hosting(fn)
        try:
            return _call(fn, args, kwargs, self.timeout)
        except NoAnswer:
            message = (f"{self.name} gave no answer in {self.timeout:g} s ({what}); its call is left running on a "
                       f"daemon thread and {self.name} is not called again in this process")
            _HUNG[id(self._impl)] = (self._impl, message)
            raise NoAnswer(message) from None

    def build(self, weights, **options):
        fn = self.run(self._impl.build, (weights,), options, "build")
        return _GuardedFn(self, fn, weights, options)


class _GuardedFn:
    def __init__(self, guard: Guarded, fn, weights, options):
        if not callable(fn):
            raise Malformed(f"{guard.name}.build returned {_describe(fn)}, expected a function")
        self._guard, self._fn, self._weights, self._options = guard, fn, weights, options

    def __getattr__(self, attr):
        """The function's other attributes (``init_cache``, ``vjp``...): methods run under the deadline, their
        results as they come (return numpy arrays: an MLX array may not be readable on another thread)."""
        value = getattr(self._fn, attr)
        if not callable(value):
            return value
        return lambda *a, **k: self._guard.run(value, a, k, attr)

    def __call__(self, query, key=None, value=None, **kwargs):
        res = self._guard.run(self._fn, (query, key, value), kwargs, "a call", host=True)
        return check_answer(self._guard, res, self._weights, self._options, query, key, value, kwargs)


def _hosting(fn):
    def call(*args, **kwargs):
        res = fn(*args, **kwargs)
        return tuple(_host(x) for x in res) if isinstance(res, (tuple, list)) else _host(res)
    return call


def _host(x):
    if not type(x).__module__.startswith("mlx"):
        return x
    try:
        if "bfloat16" in str(getattr(x, "dtype", "")):
            import mlx.core as mx

            x = x.astype(mx.float32)
        return np.array(x)
    except Exception as err:  # noqa: BLE001 - an answer numpy cannot read is reported as such
        return Unreadable(x, err)


def guard(impl, timeout=DEFAULT_TIMEOUT, finite="declared") -> Guarded:
    """``impl`` under guard (itself if it already is, with this ``timeout``)."""
    if isinstance(impl, Guarded):
        impl = impl._impl
    return Guarded(impl, timeout, finite)
