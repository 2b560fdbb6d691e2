"""What the zoo's adapters share: masks in this project's semantics turned into one keep mask."""

from __future__ import annotations

import contextlib
import os

import numpy as np


def keep_mask(B, H, T, S, mask=None, key_mask=None, causal=False, align="bottom_right"):
    """(B, H, T, S) bool keep mask (True = may attend) and the (B, H, T, S) float32 additive part of a
    float mask (None without one), from this project's mask arguments; ``causal`` aligned by ``align``
    ("bottom_right": j <= i + S - T; "top_left": j <= i)."""
    keep = np.ones((B, H, T, S), bool)
    add = None
    if mask is not None:
        m = np.asarray(mask)
        m = np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), (B, H, T, S))
        if m.dtype.kind == "f":
            keep &= m != -np.inf
            add = np.where(np.isneginf(m), 0.0, m).astype(np.float32)
        else:
            keep &= m != 0
    if key_mask is not None:
        keep &= np.asarray(key_mask, bool)[:, None, None, :]
    if causal:
        offset = S - T if align == "bottom_right" else 0
        keep &= np.arange(S)[None, :] <= np.arange(T)[:, None] + offset
    return keep, add


def additive(keep, add):
    """A float32 additive mask: ``add`` where kept, -inf where not."""
    return np.where(keep, 0.0 if add is None else add, -np.inf).astype(np.float32)


def heads_vary(mask) -> bool:
    """Whether a mask has a head axis of more than one entry (the (B, T, S) APIs cannot take it)."""
    return mask is not None and np.ndim(mask) >= 3 and np.shape(mask)[-3] > 1


@contextlib.contextmanager
def environ(**values):
    """Set environment variables for the duration (a library reading them at import), then restore
    them, so that importing a peer does not leak settings into the user's process."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if k not in os.environ})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32)
