"""The MLX backend's compiled graphs: ``mx.compile`` once per kind of call and per thread.

MLX traces a compiled function anew for each new shape or dtype, and (in 0.32) keeps a compiled
function's traces in a cache of the thread that ran it: a trace still cached when its thread ends aborts
the process at exit ("terminate called without an active exception", exit 134). So each thread keeps
its own compiled functions, which die with it.
"""

from __future__ import annotations

import threading

import mlx.core as mx

from ._options import options

_graphs = threading.local()  # .by_key: this thread's compiled functions


def compiled(key, fn, shapeless: bool = False):
    """``mx.compile(fn, shapeless=shapeless)``, made once per ``key`` (kind of call, scale, layout) and
    thread; ``fn`` itself when ``mha_mlx.options.compile`` is off."""
    if not options.compile:
        return fn
    graphs = _graphs.__dict__.setdefault("by_key", {})
    if key not in graphs:
        graphs[key] = mx.compile(fn, shapeless=shapeless)
    return graphs[key]
