"""Masks, written once against an array namespace ``xp`` (numpy or mlx.core).

Conventions (one for the whole project): a boolean mask means True = may attend; integer masks must
hold only 0 and 1 and are read as booleans; a float mask is added to the logits, and its -inf entries
are read as False (so an additive {0, -inf} mask and the boolean mask are the same mask); ``key_mask``
is (B, S) with False at padding; ``causal`` lets query i see keys j <= i + (S - T) (aligned at the
end); a sliding ``window`` W lets query i see keys j with |i + (S - T) - j| < W (with causal: the last W
keys, itself included). All of them combine by AND into one ``keep`` array broadcastable to (B, H, T, S).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._validate import array_kind


def _all(xp, x) -> bool:
    """``bool(xp.all(x))``, skipped (True) inside MLX function transformations (compile)."""
    try:
        return bool(xp.all(x))
    except (RuntimeError, ValueError) as err:  # mx.compile forbids eval; the check is best-effort there
        if "transformation" in str(err):
            return True
        raise


def check_values(xp, name: str, x) -> None:
    """Integer masks hold only 0/1; float masks hold no NaN and no +inf."""
    kind = array_kind(x)
    if kind in "iu":
        if not _all(xp, xp.logical_or(x == 0, x == 1)):
            raise ValueError(f"{name} is an integer mask and must hold only 0 and 1")
    elif kind == "f":
        if not _all(xp, xp.logical_not(xp.logical_or(xp.isnan(x), x == float("inf")))):
            raise ValueError(
                f"{name} is an additive float mask and must not hold NaN or +inf "
                f"(use -inf or a bool mask with False to hide a key)"
            )


@dataclass
class MaskSet:
    """All masks of one call, normalised.

    keep:   bool, broadcastable to (B, H, T, S), or None (every key visible); causal not included.
    bias:   float, finite, broadcastable to (B, H, T, S), added to the logits; or None.
    causal: whether the causal rule applies on top of ``keep``.
    T, S:   query and key lengths (the causal offset is S - T).
    window: the sliding window W (None: no window, also when W >= max(T, S) hides nothing).
    """

    keep: object
    bias: object
    causal: bool
    T: int
    S: int
    window: int | None = None

    def __post_init__(self):
        if self.window is not None and self.window >= max(self.T, self.S):
            self.window = None  # |i + (S - T) - j| <= max(T, S) - 1 < W for every pair

    @property
    def positional(self) -> bool:
        """Whether a rule computed from positions (causal, window) applies."""
        return self.causal or self.window is not None

    @property
    def every_key_visible(self) -> bool:
        """Whether no rule hides any key (a ``bias`` is finite: it weights keys but hides none)."""
        return self.keep is None and not self.positional

    def causal_keep(self, xp, rows=None, cols=None):
        """(T, S) bool: the positional rules; key j visible from query i iff j <= i + (S - T) (causal)
        and |i + (S - T) - j| < W (window). ``rows``/``cols``: (start, stop) of one block of it."""
        (t0, t1), (s0, s1) = rows or (0, self.T), cols or (0, self.S)
        dist = xp.arange(t0, t1)[:, None] + (self.S - self.T) - xp.arange(s0, s1)[None, :]  # (T, S) i' - j
        keep = dist >= 0 if self.causal else None
        if self.window is not None:
            w = xp.abs(dist) < self.window
            keep = w if keep is None else xp.logical_and(keep, w)
        return keep

    def key_span(self, t0: int, t1: int) -> tuple[int, int]:
        """[lo, hi): the keys that any of the queries t0..t1-1 may see under the positional rules (the
        rest are hidden from all of them: blockwise paths skip them); lo <= hi (equal: none)."""
        off, lo, hi = self.S - self.T, 0, self.S
        if self.causal:
            hi = min(hi, t1 + off)  # j <= i + off
        if self.window is not None:
            lo = max(lo, t0 + off - self.window + 1)  # j > i + off - W
            hi = min(hi, t1 - 1 + off + self.window)  # j < i + off + W
        return lo, max(lo, hi)

    def crosses(self, t0: int, t1: int, s0: int, s1: int) -> bool:
        """Whether the positional rules hide some but not all of keys s0..s1-1 from queries t0..t1-1 within
        :meth:`key_span` (False: that block needs no positional mask)."""
        off = self.S - self.T
        if self.causal and s1 - 1 > t0 + off:  # the block reaches past the first query's diagonal
            return True
        W = self.window
        return W is not None and (s0 <= t1 - 1 + off - W or s1 - 1 >= t0 + off + W)

    def full_keep(self, xp):
        """keep AND the positional rules, broadcastable to (B, H, T, S); None when every key is visible."""
        if not self.positional:
            return self.keep
        c = self.causal_keep(xp)
        return c if self.keep is None else xp.logical_and(self.keep, c)


def _to4d(xp, x):
    return x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))


def key_mask_bool(xp, key_mask, B: int, L: int):
    """A key_mask of checked shape ((B, L), or (L,) / (1, L) unbatched) as a (B, L) bool; its values
    checked (integer masks hold only 0 and 1)."""
    check_values(xp, "key_mask", key_mask)
    km = key_mask if array_kind(key_mask) == "b" else key_mask != 0
    return km.reshape(B, L)


def prepare(xp, *, mask, key_mask, causal: bool, T: int, S: int, bias_dtype, window=None) -> MaskSet:
    """Combine the user's masks (native arrays of checked shape) into a :class:`MaskSet`.

    ``mask`` broadcasts to (B, H, T, S) (or (H, T, S) unbatched); ``key_mask`` is a (B, S) bool from
    :func:`key_mask_bool` (or a cache step).
    """
    keep = None
    bias = None
    if mask is not None:
        check_values(xp, "mask", mask)
        mask = _to4d(xp, mask)
        kind = array_kind(mask)
        if kind == "f":
            bias = mask.astype(bias_dtype)
            hidden = bias == float("-inf")
            keep = xp.logical_not(hidden)
            bias = xp.where(hidden, 0.0, bias).astype(bias_dtype)
            if _all(xp, keep):
                keep = None
        else:
            keep = mask != 0 if kind in "iu" else mask
    if key_mask is not None:
        km = key_mask.reshape(key_mask.shape[0], 1, 1, S)  # (B, 1, 1, S); B may be 0
        keep = km if keep is None else xp.logical_and(keep, km)
    return MaskSet(keep=keep, bias=bias, causal=bool(causal), T=T, S=S, window=window)
