r"""Rotary position embeddings (RoPE), written once against an array namespace ``xp``.

RoPE rotates pairs of a head's coordinates by angles proportional to the token's position p:

.. math::

    (x_a, x_b) \mapsto (x_a\cos\theta_i - x_b\sin\theta_i,\; x_a\sin\theta_i + x_b\cos\theta_i),\qquad
    \theta_i = p\,\sigma\,\beta^{-2i/d},\quad i = 0 \ldots d/2 - 1

with base :math:`\beta`, position scale :math:`\sigma` and d rotated coordinates (the first d of the
head; the rest pass unchanged). The scaled variants of long-context checkpoints replace the frequencies
:math:`\beta^{-2i/d}` by explicit ones (linear, Llama 3, YaRN: computed once by the loader), or by ones
that depend on how far the call reaches (dynamic NTK, LongRoPE), and may multiply the cosines and sines
by an attention factor (YaRN's and LongRoPE's mscale: logits scaled by its square). The pairs are :math:`(x_i, x_{i + d/2})` (split-half, the default, as
GPT-NeoX, Llama in Hugging Face and ``mlx.nn.RoPE(traditional=False)``) or :math:`(x_{2i}, x_{2i+1})`
(``traditional=True``, the RoFormer paper's layout). Because the rotations of a query at p and a key
at p' compose to one by p - p', the logits depend only on relative position.

Positions in this project: without a cache a query i of T sits at position (S - T) + i and key j at j
(aligned at the end, as the causal rule); with a cache new tokens continue from the cache's length.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RoPE:
    """Settings of the rotary position embedding applied to queries and keys.

    Args:
        fraction: the share of each head's coordinates that is rotated (GPT-NeoX's
            ``rotary_pct``); rounded down to an even count, at least 2.
        base: :math:`\\beta`, the base of the frequencies (10000 as in RoFormer and Llama).
        traditional: rotate consecutive pairs (x0, x1), (x2, x3), ... instead of (x_i, x_{i+d/2}).
        scale: multiplies the positions (position interpolation; 1 = none).
        dims: the number of rotated coordinates, instead of ``fraction``.
        inv_freq: explicit inverse frequencies, d/2 positive floats, instead of base^(-2i/d) (``dims``
            defaults to twice their number).
        attention_factor: cosines and sines are multiplied by it (YaRN's mscale; 1 = none).
        dynamic_factor: dynamic NTK scaling (Hugging Face's "dynamic"): when a call reaches position
            ``original_max`` or beyond (its last position + 1 = n > original_max), the base becomes
            base * (factor * n / original_max - factor + 1)^(d / (d - 2)) for that call's tokens.
        long_inv_freq: LongRoPE: the inverse frequencies used instead of ``inv_freq`` by a call that
            reaches past ``original_max``.
        original_max: the threshold of ``dynamic_factor`` and ``long_inv_freq`` (a positive int).

    A call's new tokens are rotated with the frequencies of that call (its last position), and keys kept
    in a cache keep the rotation they got: as Hugging Face's dynamic and LongRoPE embeddings do.

    ``mha.RoPE(dims=d, base=b, traditional=t, scale=s)`` rotates as ``mlx.nn.RoPE(d, t, b, s)`` does.
    """

    fraction: float = 1.0
    base: float = 10000.0
    traditional: bool = False
    scale: float = 1.0
    dims: int | None = None
    inv_freq: tuple | None = field(default=None, repr=False)
    attention_factor: float = 1.0
    dynamic_factor: float | None = None
    long_inv_freq: tuple | None = field(default=None, repr=False)
    original_max: int | None = None

    def __post_init__(self):
        self._check_scaling()
        for name in ("fraction", "base", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
                raise TypeError(f"rope {name} must be a finite float, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"rope fraction must be in (0, 1], got {self.fraction}")
        if self.base <= 1.0:
            raise ValueError(f"rope base must be > 1, got {self.base}")
        if self.scale <= 0.0:
            raise ValueError(f"rope scale must be > 0, got {self.scale}")
        if not isinstance(self.traditional, (bool, np.bool_)):
            raise TypeError(f"rope traditional must be True or False, got {self.traditional!r}")
        if self.dims is not None:
            d = self.dims
            if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 2 or d % 2:
                raise ValueError(f"rope dims must be an even int >= 2, got {d!r}")

    def _check_scaling(self) -> None:
        """The fields of the scaled variants: frequencies as tuples of positive floats, one threshold."""
        for name in ("inv_freq", "long_inv_freq"):
            v = getattr(self, name)
            if v is None:
                continue
            try:
                arr = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.ndim != 1 or arr.size == 0 or not (np.isfinite(arr) & (arr > 0)).all():
                raise ValueError(f"rope {name} must be a non-empty sequence of positive finite floats, got {v!r}")
            object.__setattr__(self, name, tuple(float(f) for f in arr))
        if self.long_inv_freq is not None and self.inv_freq is None:
            raise ValueError("rope long_inv_freq needs inv_freq (the frequencies of calls up to original_max)")
        sizes = {len(f) for f in (self.inv_freq, self.long_inv_freq) if f is not None}
        if len(sizes) > 1:
            raise ValueError(f"rope inv_freq and long_inv_freq differ in length ({sorted(sizes)})")
        if sizes:
            n = 2 * sizes.pop()
            if self.dims is None:
                object.__setattr__(self, "dims", n)
            elif self.dims != n:
                raise ValueError(f"rope dims={self.dims!r} but {n // 2} inverse frequencies rotate {n} coordinates")
        f = self.attention_factor
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not np.isfinite(f) or f <= 0:
            raise ValueError(f"rope attention_factor must be a positive finite float, got {f!r}")
        object.__setattr__(self, "attention_factor", float(f))
        d = self.dynamic_factor
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, numbers.Real) or not np.isfinite(d) or d < 1:
                raise ValueError(f"rope dynamic_factor must be a finite float >= 1, got {d!r}")
            if self.inv_freq is not None:
                raise ValueError("rope dynamic_factor recomputes the frequencies from base; it excludes inv_freq")
            object.__setattr__(self, "dynamic_factor", float(d))
        m, needs = self.original_max, d is not None or self.long_inv_freq is not None
        if needs != (m is not None):
            raise ValueError("rope original_max goes with dynamic_factor or long_inv_freq (both or neither), got "
                             f"original_max={m!r}")
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1):
            raise ValueError(f"rope original_max must be a positive int, got {m!r}")

    @property
    def plain(self) -> bool:
        """Whether the frequencies are base^(-2i/d) at every length and the attention factor 1."""
        return self.inv_freq is None and self.dynamic_factor is None and self.attention_factor == 1.0

    def frequencies(self, dims: int, end: int) -> np.ndarray:
        """(dims/2,) float64 inverse frequencies of a call whose last position is ``end`` - 1."""
        reach = self.original_max is not None and end > self.original_max
        if self.dynamic_factor is not None and reach:
            if dims <= 2:
                raise ValueError(f"dynamic RoPE needs more than 2 rotated coordinates, got {dims}")
            f = self.dynamic_factor
            base = self.base * (f * end / self.original_max - (f - 1.0)) ** (dims / (dims - 2))
        elif self.inv_freq is not None:
            return np.array(self.long_inv_freq if reach and self.long_inv_freq is not None else self.inv_freq)
        else:
            base = self.base
        return base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)

    def rotated_dims(self, head_dim: int) -> int:
        """d, the number of coordinates of a head of width ``head_dim`` that are rotated."""
        if self.dims is not None:
            if self.dims > head_dim:
                raise ValueError(f"rope dims={self.dims} exceeds head_dim={head_dim}")
            return self.dims
        d = int(head_dim * self.fraction) // 2 * 2
        if d < 2:
            raise ValueError(f"rope fraction={self.fraction} of head_dim={head_dim} rotates fewer than 2 "
                             f"coordinates; RoPE needs head_dim * fraction >= 2")
        return d

    def angles(self, offset: int, length: int, dims: int) -> np.ndarray:
        """(length, dims/2) float64 angles of positions offset .. offset + length - 1."""
        inv_freq = self.frequencies(dims, offset + length)  # (d/2,)
        pos = (offset + np.arange(length, dtype=np.float64)) * self.scale  # (L,)
        return pos[:, None] * inv_freq[None, :]


def as_rope(value) -> RoPE | None:
    """The layer's ``rope=`` argument: None/False (off), True (defaults), a :class:`RoPE` or a dict."""
    if value is None or value is False:
        return None
    if value is True:
        return RoPE()
    if isinstance(value, RoPE):
        return value
    if isinstance(value, dict):
        known = ("fraction", "base", "traditional", "scale", "dims", "inv_freq", "attention_factor", "dynamic_factor",
                 "long_inv_freq", "original_max")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"rope got unknown settings {unknown}; known: {', '.join(known)}")
        return RoPE(**value)
    raise TypeError(f"rope must be None, True, an mha.RoPE or a dict of its settings, got {type(value).__name__}")


@functools.lru_cache(maxsize=8)
def _tables(rope: RoPE, offset: int, length: int, dims: int, dtype: str):
    """(cos, sin) (length, dims/2) times the attention factor, from float64 angles rounded once to
    ``dtype``; read-only, and kept for the next few calls: every layer of a model decoding a token
    rotates the same positions with the same settings."""
    theta = rope.angles(offset, length, dims)  # (L, d/2)
    f = rope.attention_factor
    out = tuple((g(theta) * f).astype(dtype) for g in (np.cos, np.sin))
    for t in out:
        t.flags.writeable = False
    return out


@functools.lru_cache(maxsize=16)
def _partners(dims: int, traditional: bool):
    """(perm, sign) (d,): each rotated coordinate's partner in its pair, and -1 on a pair's first one."""
    h = dims // 2
    if traditional:  # pairs (2i, 2i + 1)
        perm, sign = np.arange(dims).reshape(h, 2)[:, ::-1].reshape(dims), np.tile([-1.0, 1.0], h)
    else:  # pairs (i, i + d/2)
        perm, sign = np.concatenate([np.arange(h, dims), np.arange(h)]), np.repeat([-1.0, 1.0], h)
    for t in (perm, sign):
        t.flags.writeable = False
    return perm, sign


@functools.lru_cache(maxsize=8)
def _signed_tables(rope: RoPE, offset: int, length: int, dims: int, dtype: str):
    """numpy's form of the rotation, rot = x * C + x[..., perm] * S over the d rotated coordinates: C
    (length, d) the cosines, S the sines with the sign of each pair's first coordinate flipped (both
    times the attention factor, rounded once to ``dtype`` as :func:`_tables` rounds them), perm each
    coordinate's partner (:func:`_partners`). The same products and sums as the pairwise formula
    (a - b s equals a + b (-s) exactly), in three numpy calls instead of seven."""
    perm, sign = _partners(dims, rope.traditional)
    theta = rope.angles(offset, length, dims)  # (L, d/2)
    both = np.repeat(theta, 2, axis=-1) if rope.traditional else np.concatenate([theta, theta], axis=-1)
    f = rope.attention_factor
    out = (np.cos(both) * f).astype(dtype), (np.sin(both) * f * sign).astype(dtype), perm
    for t in out[:2]:
        t.flags.writeable = False
    return out


def apply_rope(xp, x, rope: RoPE, offset: int, acc_dtype=None):
    """Rotate (B, H, L, D) heads at positions offset .. offset + L - 1; same dtype out.

    The angles are computed in float64 and their cosines and sines (times the attention factor) rounded
    once to ``acc_dtype`` (default: x's dtype), in which the rotation runs.
    """
    L, D = x.shape[-2], x.shape[-1]
    d = rope.rotated_dims(D)
    acc = x.dtype if acc_dtype is None else acc_dtype
    xa = x if x.dtype == acc else x.astype(acc)  # (no copy when x has it: the rotation makes new arrays)
    if xp is np:
        C, S, perm = _signed_tables(rope, offset, L, d, np.dtype(acc).str)
        rot = (xa if d == D else xa[..., :d]) * C
        rot += xa[..., perm] * S
    else:  # MLX: float32 tables (no float64 on its GPUs), cast to the accumulation dtype
        cos, sin = (xp.array(t).astype(acc) for t in _tables(rope, offset, L, d, "<f4"))
        if rope.traditional:
            a, b = xa[..., 0:d:2], xa[..., 1:d:2]
            rot = xp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(tuple(x.shape[:-1]) + (d,))
        else:
            a, b = xa[..., : d // 2], xa[..., d // 2: d]
            rot = xp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    if d < D:
        rot = xp.concatenate([rot, xa[..., d:]], axis=-1)
    return rot if rot.dtype == x.dtype else rot.astype(x.dtype)
