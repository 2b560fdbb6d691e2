"""What a user may tune in the MLX backend (``mha_mlx.options``), and :func:`small_blocks` for tests.

``options`` says when a call leaves MLX's fused kernel for the blockwise path (mha_mlx._blockwise) and
how big the blocks are. It is a checked :class:`mha._settings.Settings`: every assignment is checked,
and ``with mha_mlx.options.override(score_bytes=0): ...`` sets and restores. The defaults that needed a
measurement name the benchmark that gave them (figures in docs/performance.md).
"""

from __future__ import annotations

from mha._settings import Settings


class Options(Settings):
    """Tuning of the MLX backend (``mha_mlx.options``); None means chosen per call.

    Attributes:
        score_bytes: a call runs blockwise when its score matrix, B x H x T x S float32 values, would
            take more than this many bytes (default 256 MiB; 0: every call; None: never). On MLX's CPU
            device the fused kernel holds that whole matrix; the blockwise path needs a few blocks of it
            and takes a little longer (``benchmarks/mlx_long.py``), so the default keeps the faster
            kernel while the matrix is modest and bounds memory beyond.
        gpu: apply ``score_bytes`` on a GPU too (default False: Metal and cuDNN run MLX's kernel without
            the score matrix for many shapes).
        block_q, block_k: queries and keys per block (None: up to 1024 keys, and as many queries as
            keep one block of logits, all batch elements and heads together, near 4 MiB).
        compile: ``mx.compile`` the few elementwise steps around the fused kernel, one graph per kind of
            call and thread (default True; False runs them op by op, for measuring and debugging).
    """

    _name = "mha_mlx.options"
    _spec = {
        "score_bytes": (256 << 20, "int?", 0, "a call runs blockwise when its float32 score matrix would take "
                                             "more bytes; 0: every call, None: never"),
        "gpu": (False, "bool", None, "whether score_bytes applies on a GPU too"),
        "block_q": (None, "int?", 1, "queries per block; None: chosen per call"),
        "block_k": (None, "int?", 1, "keys per block; None: up to 1024"),
        "compile": (True, "bool", None, "mx.compile the fused path's steps; False: op by op"),
    }
    __slots__ = tuple(_spec)


options = Options()


def small_blocks(block_q: int = 2, block_k: int = 3):
    """Run every call blockwise with tiny blocks, for testing: ``with mha_mlx.small_blocks(2, 3): ...``.

    Queries in blocks of ``block_q``, keys in blocks of ``block_k``, whatever the call's size, so that
    every branch of the blockwise path runs on problems of a few tokens. The sizes are checked here; the
    settings are process-wide (``options.override``), restored on exit."""
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        options._checked(name, value)
    return options.override(score_bytes=0, block_q=block_q, block_k=block_k)
