"""The numpy backend's one implementation of the rule for NaN and inf in keys and values.

A NaN or inf at a key or value a query may not see never reaches that query's output; one that it may
see makes its output NaN (mha._reference states it for every backend). The fast path takes it in two
steps: :func:`zero_nonfinite` zeroes every key/value vector holding NaN/inf before the kernel (so that
no 0 * NaN reaches a sum), and :func:`poisoned_rows` says which queries see one, whose contexts the
kernel then sets to NaN (and, for a non-finite key, their weights and lse: a NaN logit).
"""

from __future__ import annotations

import numpy as np


def zero_nonfinite(k, v, aug: bool, own: bool):
    """(k, v, bad_k, bad_v): (B, S, Hkv, Dq) keys and values with every vector that holds NaN/inf zeroed
    (the augmented form's ones column kept), and which were: (B, S, Hkv) bools.

    Zeroed in place when the call owns the arrays (``own``: views of its own projections), else in copies
    laid out like them (a cache's buffers keep what they hold). Either way the kernel then reads the
    memory layout of a clean call: BLAS rounds differently by layout, and a compact copy of strided keys
    once moved a row that cannot see the NaN by one ulp (window 2, tiny blocks), against the promise that
    such rows stay bitwise equal.
    """
    bad_k, bad_v = ~np.isfinite(k).all(-1), ~np.isfinite(v).all(-1)
    if not own:
        k, v = copy_like(k), copy_like(v)
    k[bad_k] = 0
    v[bad_v] = 0
    if aug:
        k[..., -1] = v[..., -1] = 1
    return k, v, bad_k, bad_v


def copy_like(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` with the same strides (``a`` has non-negative strides)."""
    span = sum((n - 1) * st for n, st in zip(a.shape, a.strides)) + a.itemsize if a.size else a.itemsize
    out = np.lib.stride_tricks.as_strided(np.empty(span // a.itemsize, a.dtype), a.shape, a.strides)
    np.copyto(out, a)
    return out


def poisoned_rows(bad_k, bad_v, masks, G: int, b0: int = 0, h0: int = 0):
    """(rows, key_rows), (B, H, T) bools: the queries that see a non-finite key or value (their output is
    NaN) and those that see a non-finite key (their weights and lse too).

    bad_k, bad_v: (B, S, Hkv) from :func:`zero_nonfinite` (H = Hkv * G query heads); ``masks``: the call's
    MaskSet; b0, h0: where bad_k's batch element and first query head sit in the masks' axes (a task of
    the split by head groups sees one batch element and some heads).
    """
    B, S, Hkv = bad_k.shape
    T = masks.T
    full = masks.cut(batch=(b0, b0 + B), heads=(h0, h0 + Hkv * G)).visible(np)  # (B?, H?, T?, S?)
    if full is None:
        full = np.ones((1, 1, 1, S), bool)

    def sees(bad):
        rep = np.repeat(bad.transpose(0, 2, 1), G, axis=1)[:, :, None, :]  # (B, H, 1, S)
        return np.broadcast_to((rep & full).any(-1), (B, Hkv * G, T))

    by_key = sees(bad_k)
    return by_key | sees(bad_v), by_key
