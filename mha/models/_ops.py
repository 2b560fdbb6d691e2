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


def rms_norm(xp, x, weight, eps: float):
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight, statistics in float32 or wider
    (Llama's and Gemma's rule; Gemma's (1 + w) is folded into ``weight`` at load)."""
    if xp is np and x.dtype in (np.float32, np.float64):  # the same steps in fewer numpy calls (decode steps)
        s = np.add.reduce(x * x, axis=-1, keepdims=True)  # (..., 1)
        s *= x.dtype.type(1.0 / x.shape[-1])
        s += x.dtype.type(eps)
        np.sqrt(s, out=s)
        y = x / s
        y *= weight
        return y
    acc = x.dtype if x.dtype in (xp.float32, getattr(xp, "float64", None)) else xp.float32
    x32 = x if x.dtype == acc else x.astype(acc)
    r = 1.0 / xp.sqrt(xp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # (..., 1)
    y = x32 * r
    return (y if y.dtype == x.dtype else y.astype(x.dtype)) * weight


def silu(xp, x):
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2 (no overflow for large |x|)."""
    return x * (0.5 + 0.5 * xp.tanh(0.5 * x))


def gelu_tanh(xp, x):
    """GELU's tanh approximation (GPT-2's "gelu_new", torch's approximate="tanh")."""
    return 0.5 * x * (1.0 + xp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def gelu_fast(xp, x):
    """transformers' "gelu_fast": 0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2)))."""
    return 0.5 * x * (1.0 + xp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def relu(xp, x):
    return xp.maximum(x, 0)


ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh, "gelu_fast": gelu_fast, "relu": relu}


def gated(xp, h, F: int, act: str, scratch: dict | None = None):
    """act(h[..., :F]) * h[..., F:] for the gated MLPs (Llama's SwiGLU, Gemma's GeGLU); numpy's SiLU in
    place in one array (a prefill's (T, F) temporaries are tens of MB each), taken from ``scratch`` (a
    dict of buffers by shape) when given."""
    gate, up = h[..., :F], h[..., F:]
    if xp is not np or act != "silu":
        return ACTIVATIONS[act](xp, gate) * up
    g = buffer(scratch, "gated", gate.shape, gate.dtype)
    np.multiply(gate, gate.dtype.type(0.5), out=g)  # silu(x) = x (1 + tanh(x / 2)) / 2
    np.tanh(g, out=g)
    g *= g.dtype.type(0.5)
    g += g.dtype.type(0.5)
    g *= gate
    g *= up
    return g


def softcap(xp, x, cap: float):
    """cap * tanh(x / cap): logits squashed into (-cap, cap) (Gemma 2's soft-capping)."""
    return xp.tanh(x / cap) * cap


def padded_positions(key_mask):
    """Learned positions of a left-padded batch, (B, T): each row counts from its first real token (padding
    at 0); None for None (0 .. T - 1)."""
    return None if key_mask is None else np.maximum(np.cumsum(key_mask, axis=1) - 1, 0)


def buffer(scratch: dict | None, name: str, shape: tuple, dtype) -> np.ndarray:
    """``scratch[name]`` (uninitialised), made on first use or when its shape or dtype differs, so that one
    forward's layers share it; a fresh array without ``scratch``."""
    buf = None if scratch is None else scratch.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.empty(shape, dtype)
        if scratch is not None:
            scratch[name] = buf
    return buf
