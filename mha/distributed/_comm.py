"""The exchanges between ranks, over ``mx.distributed``, each bounded by a timeout.

Every collective (all_sum, all_gather) and every ring step (send to the next rank, receive from the
previous one) is evaluated on one daemon thread per :class:`Comm`; the calling thread waits for it at
most ``timeout`` seconds. MLX releases the GIL while it waits on a socket, so the wait can be bounded
even where MLX's own receive would block for ever (a peer that is alive but never sends). A peer whose
process ended is reported by MLX itself ("connection to a peer was lost"); both become a
:class:`DistributedError` naming the rank, the operation and the way out. After one, the group is
left in an unknown state: the :class:`Comm` refuses further work, and the process should exit.

numpy arrays travel as MLX arrays on the CPU (converted in and out here); MLX arrays are evaluated on
the caller's thread first, so the exchange thread only ever sees finished arrays.
"""

from __future__ import annotations

import numbers
import queue
import threading

import numpy as np

import mlx.core as mx


class DistributedError(RuntimeError):
    """An exchange between ranks failed: a peer's process ended, or the group is unusable after a timeout."""


class PeerTimeout(DistributedError, TimeoutError):
    """No answer from the other ranks within the timeout (a rank died, hangs, or makes other calls)."""


def check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def resolve_group(group):
    """``group`` as an ``mx.distributed.Group``: None is the global group (``mx.distributed.init()``)."""
    if group is None:
        return mx.distributed.init()
    if not isinstance(group, mx.distributed.Group):
        raise TypeError(f"group must be an mx.distributed.Group (from mx.distributed.init()) or None for the "
                        f"global group, got {type(group).__name__}")
    return group


class Comm:
    """One group's exchanges, each bounded by ``timeout`` seconds (None: wait for ever)."""

    def __init__(self, group, timeout):
        self.group = resolve_group(group)
        self.rank, self.size = self.group.rank(), self.group.size()
        self.timeout = check_timeout(timeout)
        self._jobs: queue.Queue = queue.Queue()
        self._broken: str | None = None
        self._thread = None

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, size={self.size}, timeout={self.timeout})"

    # -- the exchange thread -------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            fn, box = self._jobs.get()
            try:
                box.put((True, fn()))
            except BaseException as err:  # handed to the waiting caller
                box.put((False, err))

    def submit(self, fn, what: str):
        """Start ``fn()`` (MLX communication, evaluated) on the exchange thread; :meth:`wait` for it."""
        if self._broken:
            raise DistributedError(f"rank {self.rank}: the group is unusable after an earlier failure "
                                   f"({self._broken}); exit this process")
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name=f"mha-distributed-{self.rank}", daemon=True)
            self._thread.start()
        box: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((fn, box))
        return box, what

    def wait(self, ticket):
        box, what = ticket
        try:
            ok, value = box.get(timeout=self.timeout)
        except queue.Empty:
            self._broken = f"timeout in {what}"
            raise PeerTimeout(
                f"rank {self.rank} of {self.size}: no answer from the other ranks within {self.timeout:g} s during "
                f"{what} (a rank died, hangs, or did not make the same call); the group cannot be used any more, "
                f"exit this process (timeout= sets the limit: it must exceed the longest time a rank computes "
                f"between two exchanges)") from None
        if not ok:
            if isinstance(value, RuntimeError) and "[" in str(value):  # MLX's own report, e.g. "[ring] ..."
                self._broken = f"{what}: {value}"
                raise DistributedError(f"rank {self.rank} of {self.size}: {what} failed: {value} (a peer's process "
                                       f"ended); exit this process") from value
            raise value
        return value

    def run(self, fn, what: str):
        return self.wait(self.submit(fn, what))

    # -- operations --------------------------------------------------------------------------------
    def all_sum(self, x, what: str = "all_sum"):
        """The sum over ranks of ``x`` (numpy or MLX array; the result is of the same kind)."""
        a, back = _to_mx(x)
        out = self.run(lambda: _evaluated(mx.distributed.all_sum(a, group=self.group, stream=mx.cpu)), what)
        return back(out)

    def all_gather(self, x, what: str = "all_gather"):
        """(size * n, ...) from each rank's (n, ...) ``x``, in rank order (same shapes on every rank)."""
        a, back = _to_mx(x)
        out = self.run(lambda: _evaluated(mx.distributed.all_gather(a, group=self.group, stream=mx.cpu)), what)
        return back(out)

    def ring_shift(self, arrays, shapes, what: str = "ring step"):
        """Send ``arrays`` (numpy or MLX) to rank + 1 and receive MLX arrays of ``shapes`` (a list of
        (shape, MLX dtype)) from rank - 1, on the exchange thread; returns a ticket for :meth:`wait`.
        Even ranks send first and odd ranks receive first, so a ring of any size cannot deadlock."""
        nxt, prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        out = [_to_mx(a)[0] for a in arrays]

        def step():
            def send():
                if out:
                    mx.eval([mx.distributed.send(a, nxt, group=self.group, stream=mx.cpu) for a in out])

            def recv():
                got = [mx.distributed.recv(s, dt, prev, group=self.group, stream=mx.cpu) for s, dt in shapes]
                if got:
                    mx.eval(got)
                return got

            if self.rank % 2 == 0:
                send()
                return recv()
            got = recv()
            send()
            return got

        return self.submit(step, what)


def _evaluated(a):
    mx.eval(a)
    return a


def _to_mx(x):
    """(an evaluated MLX array, a function turning an MLX result back into the kind of ``x``)."""
    if isinstance(x, mx.array):
        mx.eval(x)
        return x, (lambda a: a)
    arr = np.ascontiguousarray(x)
    kind = arr.dtype
    return mx.array(arr, dtype=mx_dtype(kind)), (lambda a: np.array(a, copy=True).astype(kind, copy=False))


def mx_dtype(dtype):
    """The MLX dtype of a numpy or MLX dtype (for receiving)."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    name = np.dtype(dtype).name
    return mx.bool_ if name == "bool" else getattr(mx, name)
