"""What a user may tune in the numpy fast path (``mha_cpu.options``), and the test-only settings behind
:func:`small_blocks`.

``options`` holds the four settings worth tuning: worker threads, query and key block sizes, and how
much memory each thread keeps for reusable temporaries. Every assignment is checked, with the
project's error standard. Everything else the fast path decides per call, from thresholds in
:data:`tuning`, which only :func:`small_blocks` changes (to run every branch of the kernel on tiny
problems, as the property suite does).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from mha._settings import Settings


class Options(Settings):
    """Tuning of the numpy fast path (``mha_cpu.options``); None means chosen per call.

    Attributes:
        threads: worker threads for one call (None: one per CPU this process may use; 1: no pool).
        block_q: queries per task (None: chosen per call from a 16 MiB budget of logits, 16 to 256, or up
            to 1024 // heads for a task of few heads).
        block_k: keys per step of the online softmax, when a call's keys do not fit in one block.
        scratch_bytes: temporaries up to this size are kept per thread and reused across calls (0:
            never); ``mha_cpu.free_scratch()`` lets them go.
    """

    _name = "mha_cpu.options"
    _spec = {
        "threads": (None, "int?", 1, "worker threads for one call; None: one per CPU, 1: no pool"),
        "block_q": (None, "int?", 1, "queries per task; None: chosen per call"),
        "block_k": (512, "int", 1, "keys per step of the online softmax"),
        "scratch_bytes": (16 << 20, "int", 0, "temporaries up to this size are reused across calls; 0: never"),
    }
    __slots__ = tuple(_spec)


options = Options()


@dataclass
class Tuning:
    """Per-call thresholds of the fast path, measured on this project's machines; changed only by
    :func:`small_blocks` (tests).

    single_pass_max: up to this many keys a task takes all its keys in one block.
    single_pass_floats: ... and also when the whole call's logits (T x H x S per batch element) fit in
        this many floats (decoding: a few queries against a long cache).
    min_parallel_flops: below this much work per call (FLOPs) the calling thread alone, with BLAS's
        threads or not as learnt (mha_cpu._pool.BlasChoice), beats the pool (measured on the 2-core CI
        VM in fresh processes at E=512, H=8: 0.75x the pool's time at T=32, 0.85x at T=96, 1.16x at
        T=128, 2.1e8 and 3.0e8 FLOPs; projection-heavy calls of few rows gain most).
    min_task_flops: the split by head groups makes no more tasks than leave each this much work (at
        1x512x512x8, 1.6 GFLOP: 2 tasks measured 3% faster than 4 and 7% faster than 8).
    min_split_work: fewer tasks than workers: split key/value heads over them from this many logits on.
    scratch_min: temporaries smaller than this come from malloc (cheap at that size), not scratch.
    split: how self-attention is shared out: "auto" (by head groups when there are at least two
        tasks per worker, else by query rows), "rows" or "groups" (always by head groups).
    tile_rows, tile_cols, tile_align: the least rows and columns of a tile of a projection shared out
        over the workers (below them the GEMMs lose speed), columns a multiple of tile_align.
    """

    single_pass_max: int = 4096
    single_pass_floats: int = 1 << 21
    min_parallel_flops: float = 2.5e8
    min_task_flops: float = 8e8
    min_split_work: int = 1 << 16
    scratch_min: int = 64 << 10
    split: str = "auto"
    tile_rows: int = 256
    tile_cols: int = 64
    tile_align: int = 16


tuning = Tuning()
_lock = threading.Lock()


class small_blocks:
    """Run the numpy fast path with tiny blocks, for testing: ``with mha_cpu.small_blocks(2, 3): ...``.

    Queries in blocks of ``block_q``, keys in steps of ``block_k`` (the online softmax from block_k + 1
    keys on), ``threads`` workers even for tiny problems (so the pool and the split of key/value heads
    over idle workers run), self-attention shared out as ``split`` ("groups", "rows" or "auto"), every
    temporary from the reused scratch buffers however small. Every branch of the kernel then runs on
    problems of a few tokens. It changes process-wide settings: not for use while other threads call
    the layer.
    """

    def __init__(self, block_q: int = 2, block_k: int = 3, *, threads: int = 3, split: str = "groups"):
        if split not in ("auto", "rows", "groups"):
            raise ValueError(f"split must be 'auto', 'rows' or 'groups', got {split!r}")
        probe = Options()
        probe.block_q, probe.block_k, probe.threads = block_q, block_k, threads  # checks them
        self._set = dict(block_q=block_q, block_k=block_k, threads=threads)
        self._tuning = Tuning(single_pass_max=block_k, single_pass_floats=0, min_parallel_flops=0,
                              min_task_flops=0,
                              min_split_work=0, scratch_min=0, split=split, tile_rows=4, tile_cols=2,
                              tile_align=1)

    def __enter__(self):
        _lock.acquire()
        self._saved = (options.copy(), dataclasses.replace(tuning))
        for n, v in self._set.items():
            setattr(options, n, v)
        _assign(tuning, self._tuning)
        return self

    def __exit__(self, *exc):
        saved_options, saved_tuning = self._saved
        options.restore(saved_options)
        _assign(tuning, saved_tuning)
        _lock.release()


def _assign(target: Tuning, source: Tuning) -> None:
    for f in dataclasses.fields(Tuning):
        setattr(target, f.name, getattr(source, f.name))
