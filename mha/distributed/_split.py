"""Cutting inputs into the ranks' chunks, and models whose attention runs head-parallel."""

from __future__ import annotations

import copy

from .._validate import positive_int
from ._comm import resolve_group
from ._heads import HeadParallel


def chunk_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of each of ``size`` contiguous chunks of ``length`` positions, as numpy.array_split
    cuts them: the first ``length % size`` chunks one longer (T = 37 over 3 ranks: 13, 12, 12)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    size = positive_int("size", size)
    starts = [r * (length // size) + min(r, length % size) for r in range(size + 1)]
    return list(zip(starts[:-1], starts[1:]))


def chunk(x, group=None, *, axis: int = -2):
    """This rank's contiguous chunk of ``x`` along ``axis`` (default -2: the sequence axis of (B, T, E) or
    (T, E); use axis=-1 for a (B, S) key_mask), cut by :func:`chunk_bounds`."""
    g = resolve_group(group)
    n = x.shape[axis]
    start, stop = chunk_bounds(n, g.size())[g.rank()]
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def head_parallel_model(model, group=None, *, timeout: float | None = 600.0):
    """A copy of an ``mha.models`` model (e.g. ``load_bert``'s) whose attention layers are
    :class:`HeadParallel` over ``group`` (weights returned for all heads, gathered); the rest of the model
    runs whole on every rank. ``mha.models.load_bert(..., group=group)`` does this."""
    if not hasattr(model, "layers") or not hasattr(model, "forward"):
        raise TypeError(f"model must be an mha.models model (with .layers and .forward), got {type(model).__name__}")
    new = copy.copy(model)
    new.layers = [HeadParallel(layer, group, timeout=timeout, gather_weights=True) for layer in model.layers]
    return new
