"""The MLX backend: Apple GPU (Metal), CUDA, or CPU. The layer is a trainable ``mlx.nn.Module``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mha
from mha import _masks
from mha._masks import MaskSet
from mha._reference import split_heads

from . import _blockwise, _nonfinite, _options
from ._compile import compiled

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


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
    non-finite rules of the reference enforced around it; on MLX's CPU device, a call whose B x H x T x S
    score matrix would exceed ``mha_mlx.options.score_bytes`` runs blockwise instead (mha_mlx._blockwise).
    """

    backend = "mlx"
    _xp = mx
    fast_weights = False  # the fused kernel returns neither weights nor lse: such calls take the reference

    def _fast_lse(self, B, T, S) -> bool:
        return _blockwise.over_budget(B, self._config.num_heads, T, S)  # the blockwise path gives lse

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
        mx.eval(self.parameters())  # evaluated now, so that any thread can use them (see _RNG)

    def _native_params(self) -> dict:
        out = {}
        for p, attr in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            layer = self[attr]
            out[f"{p}_weight"] = layer["weight"]
            out[f"{p}_bias"] = layer.get("bias")
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
        if _blockwise.over_budget(query.shape[0], H, masks.T, masks.S):  # the scores would not fit
            q, k, v = self._positions(split_heads(q, H), split_heads(k, Hkv), split_heads(v, Hkv), pos)
            ctx, lse = _blockwise.attention(q, k, v, scale=c.effective_scale, masks=masks, return_lse=call.return_lse)
            return self._out(ctx, head_mask, p).astype(dt), None, lse  # ctx (B, T, H, D), lse (B, H, T)
        # Which keys hold NaN/inf, found on the projections while they are contiguous. RoPE keeps finite
        # numbers finite except in float16 near its largest values: there the check waits for RoPE.
        early = pos.step is None and (c.rope is None or dt != mx.float16)
        if early and masks.every_key_visible:
            # every query sees every key, so one bad key or value makes all rows of its head NaN, and through
            # the output projection all of the batch element's outputs: one flag per batch element is the
            # whole rule, added to the output bias (the fewest extra GPU kernels: MLX-CUDA pays tens of us each)
            poison = _nonfinite.per_batch(k, v)  # (B, 1, 1): 0, or NaN, added to the output bias
            q, k, v = self._positions(split_heads(q, H), split_heads(k, Hkv), split_heads(v, Hkv), pos)
            kq, kk, kv = _kernel_inputs(q, k, v)
            bias = None if masks.bias is None else _finite_bias(masks.bias, kq.dtype)  # finite: it hides no key
            ctx = mx.fast.scaled_dot_product_attention(kq, kk, kv, scale=c.effective_scale, mask=bias)
            return self._out(ctx.swapaxes(1, 2).astype(dt), head_mask, p, poison).astype(dt), None, None
        bad = _nonfinite.per_key(k, v, Hkv) if early else None  # (B, Hkv, S)
        q, k, v = self._positions(split_heads(q, H), split_heads(k, Hkv), split_heads(v, Hkv), pos)
        # decoding with a cache changes S at every step: a compiled graph would be traced anew each time
        ctx = _attend(q, k, v, c.effective_scale, masks, pos.step is None, bad, merged=True)  # (B, T, H, D)
        return self._out(ctx, head_mask, p).astype(dt), None, None

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


def _kernel_inputs(q, k, v):
    """q, k, v in the dtype MLX's kernel should compute in: half precision is widened to float32 on the
    CPU, where MLX's kernel forms the logits in the inputs' dtype (float16 overflows beyond 65504, while
    the contract is a float32 softmax) and half precision is no faster (B=1, H=8, T=S=256, D=64 on this
    project's 2-core CPU: float16 103 ms, widened 83 ms; bfloat16 87 / 82 ms). On a GPU the fused kernels
    accumulate the logits in float32 already, and half precision stays half."""
    if q.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return q, k, v
    return q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)


# Additive masks in half precision on a GPU: float16 holds no finite number below -65504, and the
# kernel's fallback (training; head sizes without a fused kernel) adds mask and logits in float16, so a
# float16 bias is clipped to +-2^14: its weight stays exp(-16384) = 0 next to any key of a normal bias,
# and a row whose visible keys all carry it still shares its weight among them (finite, never -inf).
_HALF_BIAS = 2.0**14


def _finite_bias(bias, dtype):
    """A finite float32 bias as the kernel's ``dtype``, clipped to what that dtype holds finitely (so no
    large finite negative turns into a -inf that would hide its key)."""
    if dtype == mx.float32:
        return bias
    lim = _HALF_BIAS if dtype == mx.float16 else float(mx.finfo(dtype).max)
    return mx.clip(bias, -lim, lim).astype(dtype)


def fused_attention(q, k, v, *, scale, mask=None, key_mask=None, causal=False, window=None):
    """``mx.fast.scaled_dot_product_attention`` with the project's rules on top, on heads.

    q (B, H, T, D); k, v (B, Hkv, S, D) -> (B, H, T, D). ``mask``, ``key_mask``, ``causal`` and ``window``
    as for the layer (mask broadcastable to (B, H, T, S), True = may attend, float added; mx or numpy
    arrays). The fused kernel alone returns mean(V) for a query with no visible key and lets a NaN at a
    hidden key leak (0 * NaN); here, when some keys are hidden, non-finite numbers in k and v are zeroed before the
    kernel, and afterwards rows with no visible key are set to 0 and rows that can see a key holding
    NaN/inf to NaN. The whole of it is ``mx.compile``d (one graph per kind of mask, scale and shape;
    ``mha_mlx.options.compile``), which fuses these few elementwise steps around the kernel (measured on
    the CPU at B=1, H=4, T=16, D=16: 81 us op by op, 49 us compiled, against 34 us for the bare kernel).
    """
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    mask, key_mask = (a if a is None or isinstance(a, mx.array) else mx.array(np.asarray(a))
                      for a in (mask, key_mask))
    if key_mask is not None:
        key_mask = _masks.key_mask_bool(mx, key_mask, B, S)
    masks = _masks.prepare(mx, mask=mask, key_mask=key_mask, causal=causal, T=T, S=S, bias_dtype=mx.float32,
                           window=window)
    return _attend(q, k, v, scale, masks, True, None, merged=False)


def _attend(q, k, v, scale, masks, compile: bool, bad, merged: bool):
    """:func:`fused_attention` on a MaskSet, with ``bad`` from :func:`_nonfinite.per_key` when known (None:
    found from k, v here); ``compile=False`` runs it op by op (decoding with a cache, where S grows at
    every step and each new shape would be traced anew: measured on the CPU, E=512, H=8, one token against
    1024 cached, 5.4 ms per step compiled, 4.0 ms op by op); ``merged`` returns (B, T, H, D), the kernel's
    own output layout, so no copy is made before the output projection."""
    has_keep, has_bias, has_bad = masks.keep is not None, masks.bias is not None, bad is not None
    args = [q, k, v] + [a for a in (masks.keep, masks.bias, bad) if a is not None]
    causal, window = masks.causal, masks.window

    def fn(q, k, v, *rest):
        it = iter(rest)
        keep = next(it) if has_keep else None
        bias = next(it) if has_bias else None
        bad = next(it) if has_bad else None
        return _fused(q, k, v, keep, bias, causal, window, float(scale), bad, merged)

    if compile:
        fn = compiled(("attend", has_keep, has_bias, has_bad, causal, window, float(scale), merged), fn)
    return fn(*args)


def _fused(q, k, v, keep, bias, causal: bool, window, scale: float, bad, merged: bool):
    B, H, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dt = q.dtype
    rules = MaskSet.aligned(T, S, keep=keep, bias=bias, causal=causal, window=window)
    every_key_visible = rules.every_key_visible
    if bad is None:
        bad = _nonfinite.flags(k, v)  # (B, Hkv, S)
    if not every_key_visible:
        # a NaN/inf at a hidden key must not leak into the kernel's sums (0 * NaN); the rows that see one
        # are set to NaN below (zeroing by the flags, not by isfinite again: decoding runs this op by op
        # over the whole cache, where one more pass cost 1.4x per token on MLX's CPU build)
        k = mx.where(bad[..., None], 0, k)
        v = mx.where(bad[..., None], 0, v)

    kq, kk, kv = _kernel_inputs(q, k, v)
    sees_any = None  # (b, h, T, 1): whether a query sees any key (None: all do)
    if keep is None and bias is None and window is None:
        arg = "causal" if causal else None
    else:
        keep = rules.visible(mx)
        if keep is not None:
            sees_any = mx.any(mx.broadcast_to(keep, tuple(keep.shape[:-2]) + (T, S)), axis=-1, keepdims=True)
        if bias is None:
            arg = keep  # False is filled with the lowest finite logit: rows that see nothing stay finite
        elif keep is None:
            arg = _finite_bias(bias, kq.dtype)
        else:
            # Hidden keys at -inf: strictly below every finite bias (a user's finfo(float32).min, Hugging
            # Face's fill, ties with the lowest finite number, which let a row whose visible keys all
            # carry it share its weight with hidden ones). A row that sees no key gets 0 instead, so the
            # kernel stays finite there (no NaN in its gradients); it is set to 0 below.
            arg = mx.where(keep, _finite_bias(bias, kq.dtype), float("-inf"))
            arg = mx.where(sees_any, arg, 0).astype(kq.dtype)
    out = mx.fast.scaled_dot_product_attention(kq, kk, kv, scale=scale, mask=arg).astype(dt)  # (B, H, T, D)

    bad_h = mx.repeat(bad, H // Hkv, axis=1)[:, :, None, :]  # (B, H, 1, S) or (B, H, 1, 1)
    if every_key_visible:  # a (batch, head) that has a bad key is NaN throughout
        visible = None
        touched = mx.any(bad_h, axis=-1, keepdims=True)  # (B, H, 1, 1)
    elif keep is None and causal:  # only the causal rule: work per row from indices, O(T + S)
        last = mx.arange(T) + (S - T)  # (T,) last visible key of each query
        visible = (last >= 0)[:, None]  # (T, 1)
        seen = mx.cummax(bad_h.astype(mx.int8), axis=-1)  # (B, H, 1, S): a bad key at or before j
        touched = mx.take(seen, mx.clip(last, 0, S - 1), axis=-1).swapaxes(-1, -2) > 0  # (B, H, T, 1)
        touched = mx.logical_and(touched, visible)
    else:
        keep = mx.broadcast_to(keep, tuple(keep.shape[:-2]) + (T, S))  # (b, h, T, S)
        visible = sees_any  # (b, h, T, 1)
        counts = mx.matmul(keep.astype(dt), bad_h.astype(dt).swapaxes(-1, -2))  # (B, H, T, 1)
        touched = counts > 0
    if merged:  # the kernel writes (B, H, T, D) in q's layout, which is (B, T, H, D) in memory
        out, touched = out.swapaxes(1, 2), _to_btH(touched)
        visible = None if visible is None else _to_btH(visible)
    out = mx.where(touched, mx.array(float("nan"), dt), out)
    if visible is not None:
        out = mx.where(visible, out, mx.array(0, dt))
    return out


def _to_btH(flags):
    """(b, h, t, 1) flags, any of them broadcast (1), to (b, t, h, 1)."""
    return flags.reshape((1,) * (4 - flags.ndim) + tuple(flags.shape)).swapaxes(1, 2)
