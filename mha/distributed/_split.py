"""Cutting inputs into the ranks' rows (contiguous or zigzag), their positions, and models whose attention runs
head-parallel."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np

from .._validate import positive_int
from ._comm import resolve_group
from ._heads import HeadParallel

ORDERS = ("contiguous", "zigzag")


def check_order(order) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    return order


def chunk_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of each of ``size`` contiguous chunks of ``length`` positions, as numpy.array_split
    cuts them: the first ``length % size`` chunks one longer (T = 37 over 3 ranks: 13, 12, 12)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    size = positive_int("size", size)
    starts = [r * (length // size) + min(r, length % size) for r in range(size + 1)]
    return list(zip(starts[:-1], starts[1:]))


def rank_spans(length: int, size: int, order: str = "contiguous") -> list[list[tuple[int, int]]]:
    """Each rank's positions of a sequence of ``length``, as a list of [start, stop) spans in the order the
    rank holds them. "contiguous": rank r holds chunk r of :func:`chunk_bounds`. "zigzag": the sequence in
    2 x size chunks, rank r holds chunks r and 2 size - 1 - r (one early, one late), so that with causal
    attention every rank has the same work (with contiguous chunks the last rank does the most)."""
    check_order(order)
    if order == "contiguous":
        return [[b] for b in chunk_bounds(length, size)]
    bounds = chunk_bounds(length, 2 * size)
    return [[bounds[r], bounds[2 * size - 1 - r]] for r in range(size)]


def positions(spans) -> np.ndarray:
    """The positions of [(i0, i1, first position)] spans, in order."""
    if not spans:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(p, p + b - a, dtype=np.int64) for a, b, p in spans])


def runs(pos) -> list:
    """[(j0, j1, first position)]: the maximal runs of consecutive positions in ``pos`` (ints)."""
    if pos.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(pos) != 1) + 1
    starts, stops = np.concatenate([[0], cuts]), np.concatenate([cuts, [pos.size]])
    return [(int(a), int(b), int(pos[a])) for a, b in zip(starts, stops)]


def chunk(x, group=None, *, axis: int = -2, order: str = "contiguous"):
    """This rank's rows of ``x`` along ``axis`` (default -2: the sequence axis of (B, T, E) or (T, E); use
    axis=-1 for a (B, S) key_mask, axis=-2 for a mask's rows), as :func:`rank_spans` cuts them (zigzag: the
    rank's two chunks, concatenated)."""
    g = resolve_group(group)
    spans = rank_spans(x.shape[axis], g.size(), order)[g.rank()]
    parts = []
    for start, stop in spans:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop)
        parts.append(x[tuple(index)])
    if len(parts) == 1:
        return parts[0]
    return (np if isinstance(x, np.ndarray) else mx).concatenate(parts, axis=axis)


def head_parallel_model(model, group=None, *, timeout: float | None = 600.0):
    """A copy of an ``mha.models`` model (e.g. ``load_bert``'s) whose attention layers are
    :class:`HeadParallel` over ``group`` (weights returned for all heads, gathered); the rest of the model
    runs whole on every rank. ``mha.models.load_bert(..., group=group)`` does this."""
    if not hasattr(model, "layers") or not hasattr(model, "forward"):
        raise TypeError(f"model must be an mha.models model (with .layers and .forward), got {type(model).__name__}")
    new = copy.copy(model)
    new.layers = [HeadParallel(layer, group, timeout=timeout, gather_weights=True) for layer in model.layers]
    return new
