"""The MLX backend: Apple GPU (Metal), CUDA, or CPU. The layer is a trainable ``mlx.nn.Module``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mha._base import LayerBase
from mha._masks import MaskSet
from mha._reference import linear, merge_heads, nonfinite_keys, split_heads

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class _RNG:
    """Holds the dropout key outside the module's parameter tree."""

    def __init__(self, seed):
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        self.key = mx.random.key(seed)

    def next(self):
        self.key, sub = mx.random.split(self.key)
        return sub


def _linear() -> nn.Linear:
    """An ``nn.Linear`` without its random initialisation (the weights are set right after).

    ``nn.Linear(...)`` draws its initial weights from MLX's global key; left unevaluated, every such
    draw lengthens the lazy chain of key splits, and after a few thousand layers a later ``mx.grad``
    recursing through that chain overflows the stack (a segfault seen in this project's test suite).
    """
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    return layer


class MultiHeadAttention(LayerBase, nn.Module):
    """Multi-head attention on MLX (float32, float16, bfloat16; softmax in float32).

    Same constructor and call as :class:`mha.MultiHeadAttention` (without ``backend``). The projections
    are ``mlx.nn.Linear`` children ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, so the layer trains
    with ``mlx.optimizers`` and ``mx.grad``/``nn.value_and_grad``. Without weights requested (and no
    dropout) it runs MLX's fused ``mx.fast.scaled_dot_product_attention``, with the empty-row and
    non-finite rules of the reference enforced around it.
    """

    backend = "mlx"
    _xp = mx

    def _dtypes(self):
        return _DTYPES[self._config.dtype], mx.float32

    def _init_rng(self, seed) -> None:
        self._rng = _RNG(seed if seed is None else seed + 1)

    def _is_native(self, x) -> bool:
        return isinstance(x, mx.array)

    def _from_numpy(self, x):
        if x.dtype == np.float64:
            x = x.astype(np.float32)  # MLX GPUs have no float64
        return mx.array(x)

    def _set_params(self, weights) -> None:
        c, dt = self._config, _DTYPES[self._config.dtype]
        w = weights.to_dict()
        for p, attr in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            if attr not in self:
                setattr(self, attr, _linear())
            layer = getattr(self, attr)
            layer.weight = mx.array(w[f"{p}_weight"]).astype(dt)
            if c.bias:
                layer.bias = mx.array(w[f"{p}_bias"]).astype(dt)

    def _native_params(self) -> dict:
        out = {}
        for p, attr in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            layer = self[attr]
            out[f"{p}_weight"] = layer["weight"]
            out[f"{p}_bias"] = layer.get("bias")
        return out

    def _dropout_multiplier(self, shape, p, dtype):
        keep = mx.random.bernoulli(1.0 - p, shape, key=self._rng.next())
        return keep.astype(dtype) / (1.0 - p)

    def _rope(self, x, offset: int):
        """RoPE by MLX's fused kernel ``mx.fast.rope`` (half precision stays half)."""
        r = self._config.rope
        return mx.fast.rope(x, r.rotated_dims(x.shape[-1]), traditional=r.traditional, base=r.base, scale=r.scale,
                            offset=offset)

    def _fast_forward(self, query, key, value, masks, head_mask, pos, return_weights, return_lse):
        if return_weights or return_lse:  # the fused kernel gives neither
            return self._reference(query, key, value, masks, head_mask, pos)
        c, dt = self._config, query.dtype
        H, Hkv = c.num_heads, c.num_kv_heads
        p = self._native_params()
        q = split_heads(linear(mx, query, p["q_weight"], p["q_bias"]), H)  # (B, H, T, D)
        k = split_heads(linear(mx, key, p["k_weight"], p["k_bias"]), Hkv)  # (B, Hkv, S, D)
        v = split_heads(linear(mx, value, p["v_weight"], p["v_bias"]), Hkv)
        q, k, v = self._positions(q, k, v, pos)  # RoPE, the cache
        # decoding with a cache changes S at every step: a compiled graph would be traced anew each time
        ctx = fused_attention(q, k, v, scale=c.effective_scale, masks=masks, compile=pos.step is None)  # (B, H, T, D)
        if head_mask is not None:
            ctx = ctx * head_mask
        return linear(mx, merge_heads(ctx), p["o_weight"], p["o_bias"]).astype(dt), None, None  # (B, T, E)


COMPILE = True  # set mha_mlx._layer.COMPILE = False to run the fused path op by op (debugging)
_compiled: dict = {}


def fused_attention(q, k, v, *, scale, masks, compile=True):
    """``mx.fast.scaled_dot_product_attention`` with the reference's rules on top.

    The fused kernel alone returns mean(V) for a query with no visible key and lets a NaN at a hidden
    key leak (0 * NaN); here keys holding non-finite numbers are zeroed before the kernel, and
    afterwards rows with no visible key are set to 0 and rows that can see such a key to NaN. The
    whole of it is ``mx.compile``d (one graph per kind of mask, scale and shape), which fuses these
    few elementwise steps around the kernel (measured on the CPU at B=1, H=4, T=16, D=16: 81 us op by op,
    49 us compiled, against 34 us for the bare kernel). ``compile=False`` runs it op by op: decoding
    with a cache, where S grows at every step and each new shape would be traced anew (measured on the
    CPU, E=512, H=8, one token against 1024 cached: 5.4 ms per step compiled, 4.0 ms op by op).
    q (B, H, T, D); k, v (B, Hkv, S, D) -> (B, H, T, D).
    """
    has_keep, has_bias = masks.keep is not None, masks.bias is not None
    args = [q, k, v] + ([masks.keep] if has_keep else []) + ([masks.bias] if has_bias else [])
    key = (has_keep, has_bias, masks.causal, masks.window, float(scale))
    fn = _compiled.get(key) if compile else None
    if fn is None:
        def fn(q, k, v, *rest):
            it = iter(rest)
            keep = next(it) if has_keep else None
            bias = next(it) if has_bias else None
            return _fused(q, k, v, keep, bias, masks.causal, masks.window, float(scale))

        if COMPILE and compile:
            fn = mx.compile(fn)
            _compiled[key] = fn
    return fn(*args)


def _fused(q, k, v, keep, bias, causal: bool, window, scale: float):
    B, H, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dt = q.dtype
    bad = nonfinite_keys(mx, k, v)  # (B, Hkv, S)
    k = mx.where(bad[..., None], 0, k)
    v = mx.where(bad[..., None], 0, v)
    bad_h = mx.repeat(bad, H // Hkv, axis=1)[:, :, None, :]  # (B, H, 1, S)

    if keep is None and bias is None and window is None:
        arg = "causal" if causal else None
    else:
        keep = MaskSet(keep, bias, causal, T, S, window).full_keep(mx)
        if bias is None:
            arg = keep
        elif keep is None:
            arg = bias.astype(dt)
        else:
            arg = mx.where(keep, bias, mx.finfo(dt).min).astype(dt)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=arg)  # (B, H, T, D)

    if keep is None and causal:  # only the causal rule: work per row from indices, O(T + S)
        last = mx.arange(T) + (S - T)  # (T,) last visible key of each query
        visible = (last >= 0)[:, None]  # (T, 1)
        seen = mx.cummax(bad_h.astype(mx.int8), axis=-1)  # (B, H, 1, S): a bad key at or before j
        touched = mx.take(seen, mx.clip(last, 0, S - 1), axis=-1).swapaxes(-1, -2) > 0  # (B, H, T, 1)
        touched = mx.logical_and(touched, visible)
    elif keep is None:  # every key visible to every query
        visible = None
        touched = mx.any(bad_h, axis=-1, keepdims=True)  # (B, H, 1, 1)
    else:
        keep = mx.broadcast_to(keep, tuple(keep.shape[:-2]) + (T, S))  # (b, h, T, S)
        visible = mx.any(keep, axis=-1, keepdims=True)  # (b, h, T, 1)
        counts = mx.matmul(keep.astype(dt), bad_h.astype(dt).swapaxes(-1, -2))  # (B, H, T, 1)
        touched = counts > 0
    out = mx.where(touched, mx.array(float("nan"), dt), out)
    if visible is not None:
        out = mx.where(visible, out, mx.array(0, dt))
    return out
