"""The key/value cache of autoregressive decoding, written once against an array namespace ``xp``.

``cache = layer.init_cache(batch_size, max_length=None, *, max_cache=None, keep=0)`` makes one;
``layer(x_new, cache=cache, causal=True)`` projects the new tokens, appends their keys and values
(after k norm and RoPE, when the layer has them) and attends over the keys it keeps plus the new ones.
Buffers are (B, Hkv, capacity, D) in the layer's compute dtype (with GQA: the key/value heads only);
``valid`` (B, capacity) remembers which positions were padding (the ``key_mask`` given with them).

What is kept. Without a bound, every position. A rotating cache (``max_cache`` M) attends each query
to the first ``keep`` positions (never evicted: StreamingLLM's attention sinks) and to the last
M - keep positions up to itself, so a decode step sees at most M keys and keep=0 is a sliding window
of M; a layer with a ``window`` W sees only the last W positions (itself included) anyway, so its cache
keeps no more than the last W - 1 between calls. Kept keys stay contiguous in the buffer, in attended
order (the sinks first, then the rest oldest first, the new ones last): evicting moves the few sinks
up behind the kept rest, and when the buffer's end is reached the kept keys are moved to its front
(once every ~M tokens for a buffer of 2 M). An unbounded cache grows geometrically (doubling), or is
allocated once with ``max_length``; no step copies the whole cache.

Positions: the absolute position of every kept key is recorded (``cache.positions``), and the step's
:class:`mha._masks.MaskSet` carries them, so the causal and window rules hold however the kept keys
are spaced. A chunk of several new tokens in a rotating cache also hides, from each of its queries, the
kept keys a step-by-step decode would already have evicted (the eviction rule, ANDed into ``keep``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROW = 256  # the first capacity of an unbounded cache


@dataclass
class _Step:
    """One call's plan, made before anything changes: commit it with :meth:`append`."""

    cache: "KVCache"
    T: int
    sinks: int  # kept sink positions the new queries see (at the front of the attended keys)
    recent: int  # kept other positions they see
    valid_new: object  # (B, T) bool native array, or None (all real)
    key_mask: object  # (B, S) bool over the attended keys, or None (all real)
    k_pos: object  # (S,) positions of the attended keys: range or numpy int array
    evicted: object  # (T, S) numpy bool: the eviction rule of a chunk (False: already evicted), or None

    @property
    def keep_old(self) -> int:
        return self.sinks + self.recent

    @property
    def S(self) -> int:
        return self.keep_old + self.T

    @property
    def offset(self) -> int:
        """Position of the first new token (RoPE)."""
        return self.cache.offset

    @property
    def q_pos(self) -> range:
        return range(self.cache.offset, self.cache.offset + self.T)

    def append(self, k, v, finite: bool | None = None):
        """Store the new (B, Hkv, T, D) keys and values; returns the (B, Hkv, S, D) keys and values attended.
        ``finite``: whether the new ones hold no NaN/inf, when the caller knows (the cache remembers
        whether it ever held any: :attr:`KVCache.holds_nonfinite`)."""
        return self.cache._append(self, k, v, finite)


class KVCache:
    """Keys and values of the positions a layer has seen (see the module docstring).

    Attributes:
        offset: how many positions have been appended since the start (the next token's position).
        max_length: the most positions it accepts in total (None: no limit).
        window: the layer's sliding window (None: none).
        max_cache: the rotating cache's bound M (None: none); keep: its never-evicted first positions.
    """

    def __init__(self, xp, *, batch_size: int, num_kv_heads: int, head_dim: int, dtype, max_length, window,
                 owner: tuple, max_cache=None, keep: int = 0):
        self._xp = xp
        self.batch_size, self.num_kv_heads, self.head_dim, self.dtype = batch_size, num_kv_heads, head_dim, dtype
        self.max_length, self.window, self.max_cache, self.keep = max_length, window, max_cache, keep
        self._owner = owner  # what the layer's keys depend on (backend, heads, dtype, rope, norm, window)
        # the most old positions other than the sinks that a new query can see: W - 1 in a window of W,
        # M - keep - 1 in a rotating cache of M (its own key and the sinks make M)
        bounds = [b for b in (window and window - 1, max_cache and max_cache - keep - 1) if b is not None]
        self._recent_max = min(bounds) if bounds else None
        self._small = 2 * (keep + self._recent_max + 1) if bounds else None  # a bounded cache's buffer
        self.reset()
        self._alloc(self._small or (max_length if max_length is not None else GROW))

    def _alloc(self, capacity: int) -> None:
        xp, B, Hkv, D = self._xp, self.batch_size, self.num_kv_heads, self.head_dim
        self.keys = xp.zeros((B, Hkv, capacity, D), dtype=self.dtype)
        self.values = xp.zeros((B, Hkv, capacity, D), dtype=self.dtype)
        self.valid = xp.zeros((B, capacity), dtype=xp.bool_)
        self._pos = np.zeros(capacity, np.int64)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def kept(self) -> int:
        """How many keys the last call attended (all positions so far, or a bounded cache's kept ones)."""
        return self._end - self._start

    @property
    def positions(self) -> np.ndarray:
        """(kept,) int64: the absolute positions of the keys the last call attended, in that order (the last
        axis of its weights); the next call attends to those still kept of them, then its new ones."""
        return self._pos[self._start:self._end].copy()

    @property
    def holds_nonfinite(self) -> bool | None:
        """Whether a key or value with NaN/inf was ever appended since the last reset (sticky: such a key
        may still be among the kept ones); None when an append did not say."""
        return self._nonfinite

    def reset(self) -> None:
        """Forget every position (the buffers stay allocated)."""
        self.offset = self._start = self._end = self._sinks = 0
        self._padded = self._nonfinite = False

    def __repr__(self) -> str:
        extra = "".join(f", {n}={getattr(self, n)}" for n in ("max_length", "window", "max_cache") if getattr(self, n))
        extra += f", keep={self.keep}" if self.keep else ""
        return (f"KVCache(batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"offset={self.offset}, kept={self.kept}{extra})")

    # -- one call ----------------------------------------------------------------------------------
    def _plan(self, T: int, valid_new) -> _Step:
        """Check that T more positions fit and work out what the call attends over; changes nothing."""
        if self.max_length is not None and self.offset + T > self.max_length:
            raise ValueError(f"cache is full: it holds {self.offset} of max_length={self.max_length} positions "
                             f"and {T} more were given; make it with a larger max_length (or None)")
        start, end, sinks = self._start, self._end, self._sinks
        recent = end - start - sinks
        if self._recent_max is not None:
            recent = min(recent, self._recent_max)
        xp, o = self._xp, self.offset
        k_pos = range(o - recent, o + T)  # the kept others are the latest positions
        if sinks:
            k_pos = np.concatenate([self._pos[start:start + sinks], k_pos])
            if k_pos[-1] - k_pos[0] == len(k_pos) - 1:  # nothing evicted between the sinks and the rest
                k_pos = range(int(k_pos[0]), o + T)
        key_mask = None
        if valid_new is not None or self._padded:
            old = [self.valid[:, start:start + sinks], self.valid[:, end - recent:end]]
            new = xp.ones((self.batch_size, T), dtype=xp.bool_) if valid_new is None else valid_new
            key_mask = xp.concatenate(old + [new], axis=1)  # (B, S)
        evicted = None
        if self.max_cache is not None and T > 1:  # query at p sees non-sink keys k with p - k < M - keep
            kp = np.asarray(k_pos)
            rule = (kp[None, :] < self.keep) | (np.arange(o, o + T)[:, None] - kp[None, :] < self.max_cache - self.keep)
            evicted = None if rule.all() else rule
        return _Step(self, T, sinks, recent, valid_new, key_mask, k_pos, evicted)

    def _append(self, step: _Step, k, v, finite: bool | None = None):
        T, sinks, recent = step.T, step.sinks, step.recent
        if self._nonfinite is not True:
            self._nonfinite = True if finite is False else None if finite is None else self._nonfinite
        start = self._end - recent - sinks  # the sinks move up behind the kept rest (a few positions)
        if sinks and start != self._start:
            self._move(self._start, start, sinks)
        n, small = sinks + recent, self._small
        if small and self.capacity > small and n + T <= small:  # back to its size after a long chunk
            self._relocate(start, n, small)
            start = 0
        elif self._end + T > self.capacity:
            if n + T > self.capacity:  # grow: geometrically, or to what a long chunk needs
                self._relocate(start, n, max(n + T, small or 2 * self.capacity))
            else:  # a bounded cache: move the kept positions to the front
                self._relocate(start, n)
            start = 0
        a, end = start + n, start + n + T
        self.keys[:, :, a:end] = k
        self.values[:, :, a:end] = v
        self.valid[:, a:end] = True if step.valid_new is None else step.valid_new
        self._pos[a:end] = np.arange(self.offset, self.offset + T)
        self._padded = self._padded or step.valid_new is not None
        self._start, self._end = start, end
        self.offset += T
        self._sinks = min(self.keep, self.offset)
        return self.keys[:, :, start:end], self.values[:, :, start:end]

    def _move(self, src: int, dst: int, n: int) -> None:
        """Move n positions from ``src`` to ``dst`` within the buffers (overlapping moves are safe: numpy
        copies through a temporary, MLX arrays are values)."""
        self.keys[:, :, dst:dst + n] = self.keys[:, :, src:src + n]
        self.values[:, :, dst:dst + n] = self.values[:, :, src:src + n]
        self.valid[:, dst:dst + n] = self.valid[:, src:src + n]
        self._pos[dst:dst + n] = self._pos[src:src + n].copy()

    def _relocate(self, start: int, n: int, capacity: int | None = None) -> None:
        """Move the n kept positions from ``start`` to the front, into new buffers of ``capacity`` if given."""
        if capacity is not None:
            src = (self.keys, self.values, self.valid, self._pos)
            self._alloc(capacity)
            self.keys[:, :, :n] = src[0][:, :, start:start + n]
            self.values[:, :, :n] = src[1][:, :, start:start + n]
            self.valid[:, :n] = src[2][:, start:start + n]
            self._pos[:n] = src[3][start:start + n]
        elif n and start:
            self._move(start, 0, n)
        self._start, self._end = 0, n
