"""The key/value cache of autoregressive decoding, written once against an array namespace ``xp``.

``cache = layer.init_cache(batch_size, max_length)`` makes one; ``layer(x_new, cache=cache, causal=True)``
projects the new tokens, appends their keys and values (after RoPE, when the layer has it) and attends
over everything kept. The cache stores (B, Hkv, capacity, D) buffers in the layer's compute dtype, so
with GQA it holds the key/value heads only; ``valid`` (B, capacity) remembers which positions were
padding (the ``key_mask`` given with them), so that left-padded batches decode correctly.

A layer with a sliding ``window`` W gets a rotating cache: only the last W - 1 keys can be seen by a
later query, so only those are kept, in a buffer of about 2 W positions that is compacted (the kept
keys moved to its front) once every ~W tokens; memory is O(W) however long the generation runs.
Without a window the buffer holds ``max_length`` positions (allocated once), or grows in steps of 256
when ``max_length`` is None.

Kept keys are always contiguous and in order, the newest last, so the attention that follows sees an
ordinary (B, Hkv, S, D) key array whose last T entries are the new tokens: the causal and window rules
aligned at the end are exactly the decoding rules.
"""

from __future__ import annotations

from dataclasses import dataclass

GROW = 256


@dataclass
class _Step:
    """One call's plan, made before anything changes: commit it with :meth:`KVCache._append`."""

    cache: "KVCache"
    T: int
    keep_old: int  # cached positions the new queries see
    valid_new: object  # (B, T) bool native array, or None (all real)
    key_mask: object  # (B, S) bool over the attended keys, or None (all real)

    @property
    def S(self) -> int:
        return self.keep_old + self.T

    @property
    def offset(self) -> int:
        """Position of the first new token (RoPE)."""
        return self.cache.offset

    def append(self, k, v, finite: bool | None = None):
        """Store the new (B, Hkv, T, D) keys and values; (B, Hkv, S, D) keys and values attended.
        ``finite``: whether the new ones hold no NaN/inf, when the caller knows (the cache remembers
        whether it ever held any: :attr:`KVCache.holds_nonfinite`)."""
        return self.cache._append(self, k, v, finite)


class KVCache:
    """Keys and values of the positions a layer has seen (see the module docstring).

    Attributes:
        offset: how many positions have been appended since the start (the next token's position).
        max_length: the most positions it accepts in total (None: no limit).
        window: the layer's sliding window (None: every position is kept).
    """

    def __init__(self, xp, *, batch_size: int, num_kv_heads: int, head_dim: int, dtype, max_length, window,
                 owner: tuple):
        self._xp = xp
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.max_length = max_length
        self.window = window
        self._owner = owner  # (backend, num_kv_heads, head_dim, dtype name, rope, window) of the layer
        self.offset = 0
        self._start = self._end = 0  # buffer[start:end] are the kept positions, oldest first
        self._padded = False  # any position stored as padding
        self._nonfinite = False  # any key/value stored with NaN/inf, as far as appends told (holds_nonfinite)
        if window is not None:
            capacity = 2 * window
        elif max_length is not None:
            capacity = max_length
        else:
            capacity = GROW
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        xp, B, Hkv, D = self._xp, self.batch_size, self.num_kv_heads, self.head_dim
        self.keys = xp.zeros((B, Hkv, capacity, D), dtype=self.dtype)
        self.values = xp.zeros((B, Hkv, capacity, D), dtype=self.dtype)
        self.valid = xp.zeros((B, capacity), dtype=xp.bool_)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def kept(self) -> int:
        """How many positions are held now (all of them, or the last ones of a window)."""
        return self._end - self._start

    @property
    def holds_nonfinite(self) -> bool | None:
        """Whether a key or value with NaN/inf was ever appended since the last reset (sticky: such a key
        may still be among the kept ones); None when an append did not say (the MLX backend checks the
        whole cache at each call instead)."""
        return self._nonfinite

    def reset(self) -> None:
        """Forget every position (the buffers stay allocated)."""
        self.offset = self._start = self._end = 0
        self._padded = self._nonfinite = False

    def __repr__(self) -> str:
        return (f"KVCache(batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"offset={self.offset}, kept={self.kept}, max_length={self.max_length}, window={self.window})")

    # -- one call ----------------------------------------------------------------------------------
    def _plan(self, T: int, valid_new) -> _Step:
        """Check that T more positions fit and work out what the call attends over; changes nothing."""
        if self.max_length is not None and self.offset + T > self.max_length:
            raise ValueError(f"cache is full: it holds {self.offset} of max_length={self.max_length} positions "
                             f"and {T} more were given; make it with a larger max_length (or None)")
        keep_old = self.kept if self.window is None else min(self.kept, self.window - 1)
        xp = self._xp
        key_mask = None
        if valid_new is not None or self._padded:
            old = self.valid[:, self._end - keep_old:self._end]
            new = xp.ones((self.batch_size, T), dtype=xp.bool_) if valid_new is None else valid_new
            key_mask = xp.concatenate([old, new], axis=1)  # (B, S)
        return _Step(self, T, keep_old, valid_new, key_mask)

    def _append(self, step: _Step, k, v, finite: bool | None = None):
        T, keep_old = step.T, step.keep_old
        if self._nonfinite is not True:
            self._nonfinite = True if finite is False else None if finite is None else self._nonfinite
        start = self._end - keep_old
        if self.window is not None and self.capacity > 2 * self.window and keep_old + T <= 2 * self.window:
            self._relocate(start, keep_old, 2 * self.window)  # back to 2W after a long prefill
            start = 0
        if self._end + T > self.capacity:
            if keep_old + T > self.capacity:  # grow: an unbounded cache filling up, or a long chunk
                need = keep_old + T
                self._relocate(start, keep_old, max(need, 2 * self.window) if self.window is not None
                               else -(-need // GROW) * GROW)
            else:  # a rotating cache: move the kept positions to the front
                self._relocate(start, keep_old)
            start = 0
        end = start + keep_old + T
        a = start + keep_old
        self.keys[:, :, a:end] = k
        self.values[:, :, a:end] = v
        self.valid[:, a:end] = True if step.valid_new is None else step.valid_new
        if step.valid_new is not None:
            self._padded = True
        self._start, self._end = start, end
        self.offset += T
        return self.keys[:, :, start:end], self.values[:, :, start:end]

    def _relocate(self, start: int, n: int, capacity: int | None = None) -> None:
        """Move the n kept positions from ``start`` to the front, into new buffers of ``capacity`` if given
        (overlapping moves are safe: numpy copies through a temporary, MLX arrays are values)."""
        src = (self.keys, self.values, self.valid)
        if capacity is not None:
            self._alloc(capacity)
        if n and (capacity is not None or start):
            self.keys[:, :, :n] = src[0][:, :, start:start + n]
            self.values[:, :, :n] = src[1][:, :, start:start + n]
            self.valid[:, :n] = src[2][:, start:start + n]
        self._start, self._end = 0, n
