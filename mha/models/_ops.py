"""Transformer pieces around attention, generic over the array namespace ``xp`` (numpy or mlx.core)."""

from __future__ import annotations

import math

import numpy as np

_SQRT1_2 = 1.0 / math.sqrt(2.0)


def _erf_numpy(x: np.ndarray) -> np.ndarray:
    """erf for numpy (which has none): W. J. Cody's rational Chebyshev form via erfc, |error| < 1.2e-7
    (Numerical Recipes' erfcc), computed in float64 and returned in x's dtype."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0).astype(x.dtype)


def erf(xp, x):
    return _erf_numpy(x) if xp is np else xp.erf(x)


def gelu(xp, x):
    """The exact (erf) GELU that BERT's "gelu" means: x * Phi(x)."""
    return 0.5 * x * (1.0 + erf(xp, x * _SQRT1_2))


def layer_norm(xp, x, weight, bias, eps: float):
    """LayerNorm over the last axis, statistics in float32."""
    x32 = x.astype(xp.float32)
    mean = xp.mean(x32, axis=-1, keepdims=True)
    var = xp.mean(xp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) / xp.sqrt(var + eps) * weight + bias).astype(x.dtype)


