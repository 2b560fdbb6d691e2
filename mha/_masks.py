"""Masks, written once against an array namespace ``xp`` (numpy or mlx.core).

Conventions (one for the whole project): a boolean mask means True = may attend; integer masks must
hold only 0 and 1 and are read as booleans; a float mask is added to the logits, and its -inf entries
are read as False (so an additive {0, -inf} mask and the boolean mask are the same mask); ``key_mask``
is (B, S) with False at padding. ``mask`` AND ``key_mask`` make one ``keep`` array broadcastable to
(B, H, T, S); the finite part of a float mask is the ``bias``.

Positions: every query and key has an absolute position, ``q_pos`` (T,) and ``k_pos`` (S,), a
``range`` (the layer, ordinary caches: a plain call puts query i at S - T + i and key j at j, aligned at
the end) or a numpy int array (a ring step, a rotating cache that keeps its first tokens). The
positional rules are written here once, from positions:

    key j is visible from query i  iff  keep[.., i, j]
        and (not causal or k_pos[j] <= q_pos[i]) and (window is None or |q_pos[i] - k_pos[j]| < window).

:meth:`MaskSet.cut` cuts the whole set to a block of batch elements, heads, rows and columns (broadcast
axes stay broadcast); mask slicing exists nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

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


def _to4d(x):
    return None if x is None else x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))


def _as_positions(p):
    """A ``range`` as it is; anything else as a 1-D numpy int64 array."""
    if isinstance(p, range):
        return p
    return np.asarray(p, dtype=np.int64).reshape(-1)


def _bounds(p) -> tuple[int, int]:
    """(min, max) of non-empty positions."""
    if isinstance(p, range):
        return (p.start, p[-1]) if p.step > 0 else (p[-1], p.start)
    return int(p.min()), int(p.max())


def _cut_axis(x, axis: int, span):
    """``x`` (4-D) at ``span`` = (start, stop) of one axis, unless that axis is broadcast (size 1)."""
    if x is None or span is None or x.shape[axis] == 1:
        return x
    index = [slice(None)] * 4
    index[axis] = slice(*span)
    return x[tuple(index)]


@dataclass(frozen=True)
class MaskSet:
    """All masks of one call (see the module docstring).

    keep:   bool, broadcastable to (B, H, T, S) (stored 4-D), or None (every key kept); the positional
            rules are not folded in.
    bias:   float, finite, broadcastable to (B, H, T, S) (stored 4-D), added to the logits; or None.
    causal: the causal rule k_pos[j] <= q_pos[i].
    window: the sliding window W: |q_pos[i] - k_pos[j]| < W; None: no window.
    q_pos, k_pos: the positions of the T queries and S keys (``range`` or int array).

    A rule that hides nothing at these positions is dropped when the set is made (``causal`` False when
    no key lies after any query, ``window`` None when every distance is below it), so a block cut with
    :meth:`cut` says by ``positional`` alone whether it needs a positional mask.
    """

    keep: object = None
    bias: object = None
    causal: bool = False
    window: int | None = None
    q_pos: object = field(default=range(0))
    k_pos: object = field(default=range(0))

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "keep", _to4d(self.keep))
        set_(self, "bias", _to4d(self.bias))
        q, k = _as_positions(self.q_pos), _as_positions(self.k_pos)
        set_(self, "q_pos", q)
        set_(self, "k_pos", k)
        set_(self, "causal", bool(self.causal))
        if (self.causal or self.window is not None) and len(q) and len(k):
            (q0, q1), (k0, k1) = _bounds(q), _bounds(k)
            if self.causal and k1 <= q0:  # every key at or before every query
                set_(self, "causal", False)
            if self.window is not None and max(q1 - k0, k1 - q0) < self.window:  # every distance below W
                set_(self, "window", None)

    @classmethod
    def aligned(cls, T: int, S: int, *, keep=None, bias=None, causal: bool = False, window=None) -> "MaskSet":
        """The plain call's set: queries at S - T .. S - 1, keys at 0 .. S - 1 (aligned at the end)."""
        return cls(keep, bias, causal, window, range(S - T, S), range(S))

    @property
    def T(self) -> int:
        return len(self.q_pos)

    @property
    def S(self) -> int:
        return len(self.k_pos)

    @property
    def positional(self) -> bool:
        """Whether a rule computed from positions (causal, window) hides some key here."""
        return self.causal or self.window is not None

    @property
    def every_key_visible(self) -> bool:
        """Whether no rule hides any key (a ``bias`` is finite: it weights keys but hides none)."""
        return self.keep is None and not self.positional

    def cut(self, batch=None, heads=None, rows=None, cols=None) -> "MaskSet":
        """The set of one block: each argument a (start, stop) of batch elements, heads, queries (rows) or
        keys (cols), None for all; broadcast axes of keep and bias stay broadcast."""
        keep, bias = self.keep, self.bias
        for axis, span in enumerate((batch, heads, rows, cols)):
            keep, bias = _cut_axis(keep, axis, span), _cut_axis(bias, axis, span)
        q = self.q_pos if rows is None else self.q_pos[rows[0]:rows[1]]
        k = self.k_pos if cols is None else self.k_pos[cols[0]:cols[1]]
        return MaskSet(keep, bias, self.causal, self.window, q, k)

    def with_bias(self, bias) -> "MaskSet":
        """The same set with another bias (e.g. the bias in a kernel's scaled units)."""
        return replace(self, bias=bias)

    def rule(self, xp):
        """(T, S) bool of the positional rules (module docstring), or None when they hide nothing."""
        if not self.positional:
            return None
        q = np.asarray(self.q_pos, dtype=np.int64) if isinstance(self.q_pos, range) else self.q_pos
        k = np.asarray(self.k_pos, dtype=np.int64) if isinstance(self.k_pos, range) else self.k_pos
        dist = q[:, None] - k[None, :]  # (T, S) q_pos[i] - k_pos[j]
        keep = dist >= 0 if self.causal else None
        if self.window is not None:
            w = np.abs(dist) < self.window
            keep = w if keep is None else keep & w
        return keep if xp is np else xp.array(keep)

    def last_visible(self):
        """(T,) int64: for each query i, the index of the last key the positional rules leave it, when
        causal is the only rule here (no window) and the keys sit at consecutive positions (``k_pos`` a
        range of step 1): query i sees keys 0 .. last[i] (k_pos[j] <= q_pos[i]), none when last[i] is -1;
        clipped to S - 1. None otherwise (a window, no positional rule, keys at other positions)."""
        k = self.k_pos
        if not self.causal or self.window is not None or not isinstance(k, range) or k.step != 1:
            return None
        q = np.asarray(self.q_pos, dtype=np.int64)
        return np.clip(q - k.start, -1, self.S - 1)

    def visible(self, xp):
        """keep AND the positional rules, broadcastable to (B, H, T, S) (4-D); None: every key visible."""
        rule = self.rule(xp)
        if rule is None:
            return self.keep
        return rule[None, None] if self.keep is None else xp.logical_and(self.keep, rule)

    def key_span(self, t0: int = 0, t1: int | None = None) -> tuple[int, int]:
        """[lo, hi): the keys that some query t0..t1-1 may see under the positional rules (the rest are
        hidden from all of them: blockwise paths skip them); lo <= hi (equal: none)."""
        t1 = self.T if t1 is None else t1
        S = self.S
        if t1 <= t0 or S == 0:
            return 0, 0
        if not self.positional:
            return 0, S
        block = self.cut(rows=(t0, t1))
        if not block.positional:
            return 0, S
        k = self.k_pos
        if isinstance(k, range) and k.step == 1:
            q0, q1 = _bounds(block.q_pos)
            lo, hi = 0, S
            if block.causal:
                hi = min(hi, q1 - k.start + 1)  # k_pos <= q_pos
            if block.window is not None:
                lo = max(lo, q0 - block.window + 1 - k.start)  # k_pos > q_pos - W
                hi = min(hi, q1 + block.window - k.start)  # k_pos < q_pos + W
            lo, hi = min(max(lo, 0), S), min(max(hi, 0), S)
            return lo, max(lo, hi)
        seen = np.flatnonzero(block.rule(np).any(axis=0))
        return (0, 0) if seen.size == 0 else (int(seen[0]), int(seen[-1]) + 1)


def key_mask_bool(xp, key_mask, B: int, L: int):
    """A key_mask of checked shape ((B, L), or (L,) / (1, L) unbatched) as a (B, L) bool; its values
    checked (integer masks hold only 0 and 1)."""
    check_values(xp, "key_mask", key_mask)
    km = key_mask if array_kind(key_mask) == "b" else key_mask != 0
    return km.reshape(B, L)


def prepare(xp, *, mask, key_mask, causal: bool, bias_dtype, T: int | None = None, S: int | None = None,
            window=None, q_pos=None, k_pos=None, rule_keep=None) -> MaskSet:
    """Combine the user's masks (native arrays of checked shape) into a :class:`MaskSet`.

    ``mask`` broadcasts to (B, H, T, S) (or (H, T, S) unbatched); ``key_mask`` is a (B, S) bool from
    :func:`key_mask_bool` (or a cache step). Positions: ``q_pos``/``k_pos`` when given, else aligned at
    the end from T and S. ``rule_keep``: a (T, S) numpy bool ANDed into keep (a rotating cache's eviction
    rule for a chunk of new tokens), or None.
    """
    keep = None
    bias = None
    if mask is not None:
        check_values(xp, "mask", mask)
        mask = _to4d(mask)
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
    if k_pos is None:
        k_pos = range(S)
    if q_pos is None:
        q_pos = range(len(k_pos) - T, len(k_pos))
    if key_mask is not None:
        km = key_mask.reshape(key_mask.shape[0], 1, 1, len(k_pos))  # (B, 1, 1, S); B may be 0
        keep = km if keep is None else xp.logical_and(keep, km)
    if rule_keep is not None:
        rule = rule_keep[None, None] if xp is np else xp.array(rule_keep)[None, None]
        keep = rule if keep is None else xp.logical_and(keep, rule)
    return MaskSet(keep, bias, causal, window, q_pos, k_pos)
