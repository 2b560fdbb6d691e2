"""The keys and values a rank keeps for decoding with :class:`mha.distributed.SequenceParallel`."""

from __future__ import annotations

import numpy as np

from .._masks import MaskSet


class RingCache:
    """The keys and values (after RoPE) a rank keeps for decoding with :class:`SequenceParallel`: its own
    rows of every call, with their global positions. With the layer's sliding window W, a position that no
    later query can see (p <= offset - W) is dropped at the next call, so memory is bounded by the window
    (and one call's rows).
    Made by :meth:`SequenceParallel.init_cache`."""

    def __init__(self, owner, xp, batch_size: int, num_kv_heads: int, head_dim: int, dtype, max_length, window):
        self._owner, self._xp, self.batch_size, self.max_length = owner, xp, batch_size, max_length
        self.window = window
        self._shape, self._dtype = (batch_size, num_kv_heads, 0, head_dim), dtype
        self.reset()

    def reset(self) -> None:
        """Forget every position (on every rank: they must agree)."""
        xp = self._xp
        self.keys = xp.zeros(self._shape, dtype=self._dtype)  # (B, Hkv, kept, D)
        self.values = xp.zeros(self._shape, dtype=self._dtype)
        self.valid = xp.zeros((self.batch_size, 0), dtype=xp.bool_)  # (B, kept)
        self.positions = np.zeros(0, dtype=np.int64)  # (kept,) global positions
        self.offset = 0  # positions appended so far by all ranks together
        self.top = 0.0  # the largest finite |key| entry ever appended (a bound on the kept keys')

    @property
    def kept(self) -> int:
        return int(self.positions.shape[0])

    def _first_needed(self) -> int:
        """Index of the first kept key that a query of the next call may see: the next queries sit at
        positions >= offset, so the keys the layer's rules leave the query at offset (by
        :meth:`mha.MaskSet.key_span`) are the ones of use; a rank's positions ascend, so they are a suffix
        (none: every kept key is dropped)."""
        masks = MaskSet(None, None, True, self.window, range(self.offset, self.offset + 1), self.positions)
        lo, hi = masks.key_span()
        return lo if lo < hi else self.kept

    def _kept_next(self) -> int:
        """How many of the kept keys the next call attends over (after dropping the useless ones)."""
        return self.kept - self._first_needed()

    def _append(self, k, v, valid, positions, top: float, offset: int) -> None:
        """Drop the keys no query can see any more, then append (B, Hkv, n, D) keys and values, their
        validity (B, n) and positions (n,); ``offset``: the positions appended by all ranks after it."""
        xp, a = self._xp, self._first_needed()
        self.keys = xp.concatenate([self.keys[:, :, a:], k], axis=2)
        self.values = xp.concatenate([self.values[:, :, a:], v], axis=2)
        self.valid = xp.concatenate([self.valid[:, a:], valid], axis=1)
        self.positions = np.concatenate([self.positions[a:], positions])
        self.top, self.offset = max(self.top, top), offset

    def __repr__(self) -> str:
        return f"RingCache(batch_size={self.batch_size}, offset={self.offset}, kept_here={self.kept})"
