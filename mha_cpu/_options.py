"""The numpy backend's settings (:class:`mha._settings.Settings`): ``mha_cpu.options``, what users tune,
and ``thresholds``, what only tests change (:func:`small_blocks`). A path is chosen from the call's shape
and these settings alone, so the same call always takes it; defaults that needed a measurement name the
benchmark that gave them (figures in docs/performance.md)."""

from __future__ import annotations

import contextlib

from mha._settings import Settings


class Options(Settings):
    """Tuning of the numpy fast path (``mha_cpu.options``); None means chosen per call.

    Attributes:
        threads: worker threads for one call (None: one per CPU this process may use; 1: no pool).
        block_q: queries per task (None: chosen per call from a 16 MiB budget of logits, 16 to 256, or up
            to 1024 // heads for a task of few heads).
        block_k: keys per step of the online softmax, when a call's keys do not fit in one block.
        parallel_flops: calls with less work than this (FLOPs: projections and attention) run on the
            calling thread alone, larger ones on the pool (``benchmarks/threads.py --small``).
        blas_threads: BLAS's threads while a call runs on the calling thread alone (decode steps, small
            calls); None: as BLAS is configured. The pool always holds BLAS at one thread per worker
            (``benchmarks/threads.py --decode``). step_blas_threads: the same for a whole decode step of a
            decoder (``mha.models``), its layers' calls included (``benchmarks/threads.py --step``).
    """

    _name = "mha_cpu.options"
    _spec = {
        "threads": (None, "int?", 1, "worker threads for one call; None: one per CPU, 1: no pool"),
        "block_q": (None, "int?", 1, "queries per task; None: chosen per call"),
        "block_k": (512, "int", 1, "keys per step of the online softmax"),
        "parallel_flops": (2.5e8, "float", 0, "calls with less work run on the calling thread"),
        "blas_threads": (1, "int?", 1, "BLAS threads for calls on the calling thread; None: as configured"),
        "step_blas_threads": (1, "int?", 1, "BLAS threads for a decoder model's decode step; None: as configured"),
    }
    __slots__ = tuple(_spec)


class Thresholds(Settings):
    """Per-call thresholds of the kernel that only tests change (``mha_cpu._options.thresholds``), to run
    every branch on tiny problems; each setting's meaning is in ``_spec``."""

    _name = "mha_cpu thresholds"
    _spec = {
        "single_pass_max": (4096, "int", 1, "up to this many keys a task takes them in one block"),
        "single_pass_floats": (1 << 21, "int", 0, "also when the logits (T x H x S per batch element) fit this"),
        "min_split_work": (1 << 16, "int", 0, "T x H x S from which idle workers split the key/value heads"),
        "tile_rows": (256, "int", 1, "least rows of a projection tile on the pool"),
        "tile_cols": (64, "int", 1, "least columns of a projection tile on the pool"),
        "tile_align": (16, "int", 1, "projection tile columns a multiple of this"),
        "task_flops": (8e8, "float", 0, "least FLOPs of a task of the split by head groups (mha_cpu._layer)"),
    }
    __slots__ = tuple(_spec)


options = Options()
thresholds = Thresholds()


@contextlib.contextmanager
def small_blocks(block_q: int = 2, block_k: int = 3, *, threads: int = 3):
    """Run the numpy fast path with tiny blocks, for testing: ``with mha_cpu.small_blocks(2, 3): ...``.

    Queries in blocks of ``block_q``, keys in steps of ``block_k`` (the online softmax from block_k + 1
    keys on), ``threads`` workers even for tiny problems (so the pool, the split of key/value heads over
    idle workers and the split by head groups run). Every branch of the kernel then runs on problems of a
    few tokens. Process-wide, as every setting."""
    with options.override(block_q=block_q, block_k=block_k, threads=threads, parallel_flops=0.0), \
            thresholds.override(single_pass_max=block_k, single_pass_floats=0, min_split_work=0,
                                tile_rows=4, tile_cols=2, tile_align=1, task_flops=0.0):
        yield
