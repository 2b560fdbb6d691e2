r"""Rotary position embeddings (RoPE), written once against an array namespace ``xp``.

RoPE rotates pairs of a head's coordinates by angles proportional to the token's position p:

.. math::

    (x_a, x_b) \mapsto (x_a\cos\theta_i - x_b\sin\theta_i,\; x_a\sin\theta_i + x_b\cos\theta_i),\qquad
    \theta_i = p\,\sigma\,\beta^{-2i/d},\quad i = 0 \ldots d/2 - 1

with base :math:`\beta`, position scale :math:`\sigma` and d rotated coordinates (the first d of the
head; the rest pass unchanged). The pairs are :math:`(x_i, x_{i + d/2})` (split-half, the default, as
GPT-NeoX, Llama in Hugging Face and ``mlx.nn.RoPE(traditional=False)``) or :math:`(x_{2i}, x_{2i+1})`
(``traditional=True``, the RoFormer paper's layout). Because the rotations of a query at p and a key
at p' compose to one by p - p', the logits depend only on relative position.

Positions in this project: without a cache a query i of T sits at position (S - T) + i and key j at j
(aligned at the end, as the causal rule); with a cache new tokens continue from the cache's length.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

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

    ``mha.RoPE(dims=d, base=b, traditional=t, scale=s)`` rotates as ``mlx.nn.RoPE(d, t, b, s)`` does.
    """

    fraction: float = 1.0
    base: float = 10000.0
    traditional: bool = False
    scale: float = 1.0
    dims: int | None = None

    def __post_init__(self):
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
        inv_freq = self.base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)  # (d/2,)
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
        unknown = sorted(set(value) - {"fraction", "base", "traditional", "scale", "dims"})
        if unknown:
            raise ValueError(f"rope got unknown settings {unknown}; known: fraction, base, traditional, scale, dims")
        return RoPE(**value)
    raise TypeError(f"rope must be None, True, an mha.RoPE or a dict of its settings, got {type(value).__name__}")


def apply_rope(xp, x, rope: RoPE, offset: int, acc_dtype=None):
    """Rotate (B, H, L, D) heads at positions offset .. offset + L - 1; same dtype out.

    The angles are computed in float64 and their cosines and sines rounded once to ``acc_dtype``
    (default: x's dtype), in which the rotation runs.
    """
    L, D = x.shape[-2], x.shape[-1]
    d = rope.rotated_dims(D)
    acc = x.dtype if acc_dtype is None else acc_dtype
    theta = rope.angles(offset, L, d)  # (L, d/2)
    if xp is np:
        cos, sin = np.cos(theta).astype(acc), np.sin(theta).astype(acc)
    else:  # MLX: float32 tables (no float64 on its GPUs), cast to the accumulation dtype
        cos, sin = (xp.array(f(theta).astype(np.float32)).astype(acc) for f in (np.cos, np.sin))
    xa = x.astype(acc)
    if rope.traditional:
        a, b = xa[..., 0:d:2], xa[..., 1:d:2]
        rot = xp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(tuple(x.shape[:-1]) + (d,))
    else:
        a, b = xa[..., : d // 2], xa[..., d // 2: d]
        rot = xp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    if d < D:
        rot = xp.concatenate([rot, xa[..., d:]], axis=-1)
    return rot.astype(x.dtype)
