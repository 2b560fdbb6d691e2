"""The MLX backend: Apple GPU (Metal), CUDA, or CPU. The layer is a trainable ``mlx.nn.Module``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mha
from mha import _masks
from mha._reference import rms_norm, split_heads

from . import _blockwise, _core, _nonfinite, _options

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_EXTRAS = ("q_norm", "k_norm", "sinks")  # mha._weights.EXTRAS: optional parameters


class _RNG:
    """Holds the dropout key outside the module's parameter tree.

    The key kept between calls is always evaluated: an unevaluated MLX array belongs to the stream of
    the thread that made it, and another thread cannot evaluate it ("There is no Stream(cpu, 0) in
    current thread"), so a lazy key would tie the layer's dropout to one thread.
    """

    def __init__(self, seed):
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        self.key = mx.random.key(seed)
        mx.eval(self.key)

    def next(self):
        self.key, sub = mx.random.split(self.key)
        mx.eval(self.key)
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


class MultiHeadAttention(mha.MultiHeadAttention, nn.Module):
    """Multi-head attention on MLX (float32, float16, bfloat16; softmax in float32).

    Same constructor and call as :class:`mha.MultiHeadAttention` (without ``backend``). The projections
    are ``mlx.nn.Linear`` children ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, so the layer trains
    with ``mlx.optimizers`` and ``mx.grad``/``nn.value_and_grad``. Without weights requested (and no
    dropout) it runs MLX's fused ``mx.fast.scaled_dot_product_attention``, with the empty-row and
    non-finite rules of the reference enforced around it; a call asking for weights or lse, or a layer
    with ``softcap`` (the fused kernel cannot cap) takes the core's unfused path, and on MLX's CPU
    device a call whose B x H x T x S score matrix would exceed ``mha_mlx.options.score_bytes`` runs
    blockwise (mha_mlx._blockwise). The layer features' weights (``q_norm``, ``k_norm``, ``sinks``) are
    parameters beside the projections.
    """

    backend = "mlx"
    _xp = mx
    fast_weights = True  # the core (mha_mlx._core.attend) gives weights and lse: its unfused or blockwise path

    @classmethod
    def small_blocks(cls, block_q: int = 2, block_k: int = 3):
        """Every call blockwise, in tiny blocks (mha_mlx.small_blocks)."""
        return _options.small_blocks(block_q, block_k)

    def _dtypes(self):
        return _DTYPES[self._config.dtype], mx.float32

    def _init_rng(self, seed) -> None:
        self._rng = _RNG(seed if seed is None else seed + 1)

    def _is_native(self, x) -> bool:
        return isinstance(x, mx.array)

    def _from_numpy(self, x):
        """An mx.array of ``x``'s values; float64 becomes float32 (MLX GPUs have no float64). ``mx.array``
        refuses views with negative strides (x[::-1]) and non-native byte order (">f4"): those are copied
        first into a C-ordered native array (the same values, bit for bit)."""
        dt = np.dtype(np.float32) if x.dtype.kind == "f" and x.itemsize > 4 else x.dtype.newbyteorder("=")
        if x.dtype != dt or any(s < 0 for s in x.strides):
            x = x.astype(dt, order="C")
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
        for name in _EXTRAS:  # q/k norm weights (D,), sink logits (H,): trainable parameters like the rest
            if w.get(name) is not None:
                self[name] = mx.array(w[name]).astype(dt)
        mx.eval(self.parameters())  # evaluated now, so that any thread can use them (see _RNG)

    def _native_params(self) -> dict:
        out = {}
        for p, attr in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            layer = self[attr]
            out[f"{p}_weight"] = layer["weight"]
            out[f"{p}_bias"] = layer.get("bias")
        out.update({name: self.get(name) for name in _EXTRAS})
        return out

    def _settle(self, cache) -> None:
        """Schedule the evaluation of the cache's buffers (without waiting for it): an unevaluated array
        belongs to the thread that made it (see _RNG), and a cache may be continued from another thread
        (a worker pool serving one conversation)."""
        try:
            mx.async_eval(cache.keys, cache.values, cache.valid)
        except ValueError as err:  # inside mx.grad or mx.compile nothing may be evaluated: nor is it needed
            if "transformation" not in str(err):
                raise

    def _attend(self, q, k, v, masks, **kwargs):
        """The MLX core (mha_mlx._core.attend): fused, blockwise or unfused, as the call needs."""
        return _core.attend(q, k, v, masks, **kwargs)

    def _dropout_multiplier(self, shape, p, dtype):
        keep = mx.random.bernoulli(1.0 - p, shape, key=self._rng.next())
        return keep.astype(dtype) / (1.0 - p)

    def _rope(self, x, offset: int):
        """RoPE by MLX's fused kernel ``mx.fast.rope`` (half precision stays half); the scaled variants
        (``not rope.plain``) by the shared rotation (mha._rope.apply_rope)."""
        r = self._config.rope
        if not r.plain:  # explicit or length-dependent frequencies, an attention factor: the shared rotation
            return super()._rope(x, offset)
        return mx.fast.rope(x, r.rotated_dims(x.shape[-1]), traditional=r.traditional, base=r.base, scale=r.scale,
                            offset=offset)

    def _heads(self, q, k, v, pos, p):
        """(B, T, H*D) and (B, L, Hkv*D) projections -> heads (B, H, T, D), (B, Hkv, S, D): split, the q/k
        RMSNorm over D, RoPE, the cache."""
        c = self._config
        q, k, v = split_heads(q, c.num_heads), split_heads(k, c.num_kv_heads), split_heads(v, c.num_kv_heads)
        if c.qk_norm is not None:
            q = rms_norm(mx, q, p["q_norm"], c.qk_norm, mx.float32)
            k = rms_norm(mx, k, p["k_norm"], c.qk_norm, mx.float32)
        return self._positions(q, k, v, pos)

    def _key_bound(self, top, p):
        """A bound on the entries of the keys the core sees, from ``top``, the largest of the projections':
        an RMS-normalised head holds at most sqrt(D) max|k_norm|, a rotated pair at most twice the pair's."""
        c = self._config
        if c.qk_norm is not None:
            top = c.head_dim**0.5 * mx.max(mx.abs(p["k_norm"])).astype(mx.float32)
        return 2 * top if c.rope is not None else top

    def _positions(self, q, k, v, pos):
        """RoPE and the cache on (B, H, T, D) queries and (B, Hkv, L, D) keys/values."""
        if self._config.rope is not None:
            q, k = self._rope(q, pos.q_offset), self._rope(k, pos.k_offset)
        if pos.step is not None:
            k, v = pos.step.append(k, v)
        return q, k, v

    def _forward(self, call):
        query, key, value, masks, head_mask, pos = call.query, call.key, call.value, call.masks, call.head_mask, call.pos
        c, dt = self._config, query.dtype
        H, Hkv = c.num_heads, c.num_kv_heads
        p = self._native_params()
        q = _affine(query, p["q_weight"], p["q_bias"])  # (B, T, H*D)
        k = _affine(key, p["k_weight"], p["k_bias"])  # (B, S, Hkv*D)
        v = _affine(value, p["v_weight"], p["v_bias"])
        B, T, S = call.shape
        sinks, softcap = p["sinks"], c.softcap
        if call.return_weights or call.return_lse or softcap is not None or _blockwise.over_budget(B, H, T, S):
            # weights or lse asked, a softcap (the fused kernel cannot cap), or memory to bound: the core
            # chooses its unfused or blockwise path
            q, k, v = self._heads(q, k, v, pos, p)
            ctx, lse, *w = _core.attend(q, k, v, masks, scale=c.effective_scale, softcap=softcap, sinks=sinks,
                                        return_weights=call.return_weights, return_lse=call.return_lse)
            return self._out(ctx.swapaxes(1, 2), head_mask, p).astype(dt), (w[0] if w else None), lse
        # Which keys hold NaN/inf, found on the projections while they are contiguous (RoPE keeps finite
        # numbers finite except in float16 near its largest values: there, and with a cache, the fused
        # path finds them itself). When every query sees every key, one bad key or value makes all rows of
        # its head NaN, and through the output projection all of the batch element's outputs: one flag per
        # batch element, added to the output bias, is the whole rule (the fewest extra GPU kernels).
        early = pos.step is None and (c.rope is None or dt != mx.float16)
        poison = found = None
        if early and masks.every_key_visible:
            poison, top = _nonfinite.per_batch(k, v)  # (B, 1, 1): 0, or NaN
            found = (None, top)
        elif early:
            found = _nonfinite.per_key(k, v, Hkv)  # (B, Hkv, S), max |k|
        if found is not None:
            found = (found[0], self._key_bound(found[1], p))
        q, k, v = self._heads(q, k, v, pos, p)
        ctx, _ = _core.attend(q, k, v, masks, scale=c.effective_scale, sinks=sinks, return_lse=False, found=found,
                              compile=pos.step is None)  # the fused path: the checks above leave it no other
        return self._out(ctx.swapaxes(1, 2), head_mask, p, poison).astype(dt), None, None  # ctx (B, T, H, D)

    @staticmethod
    def _out(ctx, head_mask, p, poison=None):
        """(B, T, H, D) contexts -> (B, T, E): head_mask, heads concatenated, the output projection, whose
        bias gets ``poison`` (B, 1, 1) added when given (0, or NaN for a batch element to be NaN)."""
        if head_mask is not None:
            ctx = ctx * head_mask.swapaxes(1, 2)  # (B or 1, 1, H, 1)
        B, T, H, D = ctx.shape
        bias = p["o_bias"]
        if poison is not None:
            bias = poison.astype(ctx.dtype) if bias is None else bias + poison
        return _affine(ctx.reshape(B, T, H * D), p["o_weight"], bias)  # (B, T, E)


def _affine(x, weight, bias):
    """``x @ weight.T + bias`` as one ``mx.addmm`` (the bias added in the GEMM's epilogue)."""
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


def fused_attention(q, k, v, *, scale, mask=None, key_mask=None, causal=False, window=None):
    """``mx.fast.scaled_dot_product_attention`` with the project's rules on top, on heads.

    q (B, H, T, D); k, v (B, Hkv, S, D) -> (B, H, T, D). ``mask``, ``key_mask``, ``causal`` and ``window``
    as for the layer (mask broadcastable to (B, H, T, S), True = may attend, float added; mx or numpy
    arrays). The fused kernel alone returns mean(V) for a query with no visible key and lets a NaN at a
    hidden key leak (0 * NaN); here, when some keys are hidden, non-finite numbers in k and v are zeroed before the
    kernel, and afterwards rows with no visible key are set to 0 and rows that can see a key holding
    NaN/inf to NaN. The whole of it is ``mx.compile``d (one graph per kind of mask, scale and shape;
    ``mha_mlx.options.compile``), which fuses these few elementwise steps around the kernel. It is the
    fused path of the core, :func:`mha_mlx.attend` (without lse), which runs it blockwise instead where the
    layer would too (a score matrix over ``mha_mlx.options.score_bytes`` on the CPU). No key (S = 0): zeros.
    """
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    mask, key_mask = (a if a is None or isinstance(a, mx.array) else mx.array(np.asarray(a))
                      for a in (mask, key_mask))
    if key_mask is not None:
        key_mask = _masks.key_mask_bool(mx, key_mask, B, S)
    masks = _masks.prepare(mx, mask=mask, key_mask=key_mask, causal=causal, T=T, S=S, bias_dtype=mx.float32,
                           window=window)
    return _core.attend(q, k, v, masks, scale=scale, return_lse=False)[0]
