r"""RoPE settings of a checkpoint's config as an :class:`mha.RoPE`: default, linear, dynamic, llama3,
yarn and longrope, each computed as transformers' ``modeling_rope_utils`` defines it.

With d rotated coordinates, base :math:`\beta` and :math:`f_i = \beta^{-2i/d}` (i < d/2):

- default: :math:`f_i`.
- linear (position interpolation): :math:`f_i / s` for factor s.
- dynamic (NTK-aware): :math:`f_i` while a call stays within ``max_position_embeddings`` P; past it,
  the base grows to :math:`\beta (s n / P - s + 1)^{d/(d-2)}` for a call reaching position n - 1.
- llama3: wavelengths :math:`\lambda_i = 2\pi/f_i` above ``L/low_freq_factor`` (L the original
  context) divided by s, below ``L/high_freq_factor`` kept, in between blended by
  :math:`\gamma = (L/\lambda_i - a)/(b - a)`: :math:`(1-\gamma) f_i/s + \gamma f_i`.
- yarn: interpolated :math:`f_i/s` and extrapolated :math:`f_i` mixed by a linear ramp over the
  dimensions between the correction range of ``beta_fast`` and ``beta_slow`` rotations; cos and sin
  times the attention factor (default :math:`0.1 \ln s + 1`, or mscale / mscale_all_dim).
- longrope (Phi-3): :math:`f_i / e_i` with the short factors e, or the long ones for calls reaching past
  the original context; attention factor :math:`\sqrt{1 + \ln s / \ln L}`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .._rope import RoPE

TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_KEYS = {  # what each type reads besides rope_type/type, rope_theta and partial_rotary_factor
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings", "attention_factor", "factor"},
}


def _number(params: dict, key: str, where: str, *, default=None, positive=True):
    v = params.get(key, default)
    if v is None:
        if default is None:
            raise ValueError(f"{where}: rope type {params.get('rope_type')!r} needs {key!r}")
        return default
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{where}: rope {key!r} must be a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def rope_from_params(params: dict, *, head_dim: int, max_positions: int, where: str) -> RoPE:
    """The :class:`mha.RoPE` of one standardised rope parameter dict (rope_type, rope_theta, ...).

    ``head_dim``: D; ``max_positions``: the config's max_position_embeddings; ``where``: the file and
    key named in errors. Unknown types and keys raise ValueError.
    """
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in TYPES:
        raise ValueError(f"{where}: rope type {kind!r} is not supported; supported: {', '.join(TYPES)}")
    unknown = sorted(set(params) - _KEYS[kind] - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if unknown:
        raise ValueError(f"{where}: rope type {kind!r} does not take {unknown}; it reads "
                         f"{sorted(_KEYS[kind] | {'rope_theta', 'partial_rotary_factor'})}")
    base = _number(params, "rope_theta", where, default=10000.0)
    part = _number(params, "partial_rotary_factor", where, default=1.0)
    d = int(head_dim * part)
    if d < 2 or d % 2 or part > 1:
        raise ValueError(f"{where}: partial_rotary_factor={part} of head_dim={head_dim} gives {d} rotated "
                         f"coordinates; RoPE needs an even number >= 2 and at most head_dim")
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    if kind == "default":
        return RoPE(dims=d, base=base)
    if kind == "linear":
        return RoPE(dims=d, base=base, inv_freq=tuple(inv / _number(params, "factor", where)))
    if kind == "dynamic":
        factor = _number(params, "factor", where)
        if factor < 1:
            raise ValueError(f"{where}: dynamic rope factor must be >= 1, got {factor}")
        return RoPE(dims=d, base=base, dynamic_factor=factor, original_max=max_positions)
    original = int(_number(params, "original_max_position_embeddings", where, default=float(max_positions)))
    if kind == "llama3":
        return RoPE(dims=d, base=base, inv_freq=tuple(_llama3(inv, params, original, where)))
    if kind == "yarn":
        inv_freq, factor = _yarn(inv, params, base, d, original, max_positions, where)
        return RoPE(dims=d, base=base, inv_freq=tuple(inv_freq), attention_factor=factor)
    return _longrope(params, base, d, original, max_positions, where)


def _llama3(inv: np.ndarray, params: dict, original: int, where: str) -> np.ndarray:
    factor = _number(params, "factor", where)
    low, high = _number(params, "low_freq_factor", where), _number(params, "high_freq_factor", where)
    if high <= low:
        raise ValueError(f"{where}: llama3 rope needs high_freq_factor > low_freq_factor, got {high} and {low}")
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return np.where(medium, blended, out)


def _yarn(inv, params, base: float, d: int, original: int, max_positions: int, where: str):
    factor = params.get("factor")
    factor = max_positions / original if factor is None else _number(params, "factor", where)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = params.get("attention_factor")
    if att is not None:
        att = _number(params, "attention_factor", where)
    else:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        att = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast = params.get("beta_fast") or 32
    slow = params.get("beta_slow") or 1
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"{where}: rope 'truncate' must be true or false, got {truncate!r}")

    def correction_dim(rotations):
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
    extrapolation = 1 - ramp
    return (inv / factor) * (1 - extrapolation) + inv * extrapolation, att


def _longrope(params, base: float, d: int, original: int, max_positions: int, where: str) -> RoPE:
    factors = {}
    for key in ("short_factor", "long_factor"):
        v = params.get(key)
        if not isinstance(v, list) or len(v) != d // 2 or not all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) and x > 0 for x in v):
            raise ValueError(f"{where}: longrope {key!r} must be a list of {d // 2} positive numbers, got {v!r}")
        factors[key] = np.asarray(v, dtype=np.float64)
    factor = params.get("factor")
    factor = max_positions / original if factor is None else _number(params, "factor", where)
    att = params.get("attention_factor")
    if att is not None:
        att = _number(params, "attention_factor", where)
    else:
        att = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    return RoPE(dims=d, base=base, inv_freq=tuple(inv / factors["short_factor"]), attention_factor=att,
                long_inv_freq=tuple(inv / factors["long_factor"]), original_max=original)
