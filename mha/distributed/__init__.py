"""Attention past one machine, over ``mx.distributed`` (MLX's ring, JACCL, MPI or NCCL backends).

    import mlx.core as mx, mha
    from mha.distributed import HeadParallel, SequenceParallel, chunk

    group = mx.distributed.init()                 # under `mlx.launch`; alone: a group of one
    hp = HeadParallel(layer, group)               # rank r keeps its heads; every rank gets the full output
    y = hp(x)
    sp = SequenceParallel(layer, group)           # ring attention: rank r passes its chunk of the sequence
    y_r = sp(chunk(x, group), causal=True)        # and gets its rows of the output
    zz = SequenceParallel(layer, group, order="zigzag")   # causal work balanced: two chunks per rank
    y_r = zz(chunk(x, group, order="zigzag"), causal=True)

Every rank makes the same calls in the same order (SPMD). Each exchange waits at most ``timeout``
seconds (default 600) for the other ranks, then raises :class:`PeerTimeout`; a peer whose process ended
raises :class:`DistributedError`. Both leave the group unusable: exit the process. Launch with
``mlx.launch --backend ring --hosts 127.0.0.1 -n 2 script.py`` to try it on one machine (README,
"Across machines"). Needs MLX (``pip install 'mha-twin[mlx]'``); numpy layers compute in numpy and
exchange through MLX arrays on the CPU.
"""

from __future__ import annotations

try:
    import mlx.core as _mx  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised by tests/test_distributed.py in a subprocess
    raise ImportError("mha.distributed needs MLX (its mx.distributed runs the exchanges between machines): "
                      "pip install 'mha-twin[mlx]'") from _err

from ._comm import DistributedError, PeerTimeout
from ._heads import HeadParallel, UnevenSplitWarning, head_split
from ._ring import RingCache, SequenceParallel
from ._split import chunk, chunk_bounds, head_parallel_model, rank_spans

__all__ = ["DistributedError", "HeadParallel", "PeerTimeout", "RingCache", "SequenceParallel", "UnevenSplitWarning",
           "chunk", "chunk_bounds", "head_parallel_model", "head_split", "rank_spans"]
