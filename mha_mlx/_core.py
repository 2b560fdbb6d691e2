r"""The MLX attention core: ``attend(q, k, v, masks, ...) -> (context, lse)`` on projected, head-split arrays.

.. math::

    l_{ij} = s\, q_i \cdot k_j + A_{ij},\qquad
    \mathrm{context}_i = \sum_{j\ \text{visible}} \frac{e^{l_{ij}}}{\sum_{j'\ \text{visible}} e^{l_{ij'}}}\, v_j,
    \qquad \mathrm{lse}_i = \log \sum_{j\ \text{visible}} e^{l_{ij}}

for queries q (B, H, T, D) and keys/values k, v (B, Hkv, S, D) (query head h reads key/value head
h // (H / Hkv)), scale s, the additive mask A and the visible keys of ``masks`` (an
:class:`mha._masks.MaskSet`). A query that sees no key gets context 0 and lse -inf; a NaN/inf in a key or
value makes exactly the rows that see it NaN.

One of three paths computes it, chosen once per call from what is asked and the sizes:

- fused (the plain call): MLX's ``mx.fast.scaled_dot_product_attention`` as a straight line of named
  steps, :func:`fused` -- find the keys holding NaN/inf (:func:`_nonfinite.scan`), zero them where some
  keys are hidden (:func:`_clean`), scale the queries, keeping the logits inside float32
  (:func:`mha_mlx._range.scaled_queries`), encode the masks for
  the kernel (:func:`_encode`), the kernel, then the project's row rules (:func:`_row_rules`);
- unfused (weights asked, dropout; or lse asked or a softcap, when the score matrix fits): the readable
  reference, :func:`mha._reference.attend` over ``mlx.core``, softmax in float32;
- blockwise (a score matrix over ``mha_mlx.options.score_bytes`` on the CPU, which the fused kernel would
  hold whole): :mod:`mha_mlx._blockwise`, an online softmax over blocks of keys, with lse and softcap.
"""

from __future__ import annotations

import mlx.core as mx

from mha import _reference
from mha._masks import MaskSet

from . import _blockwise, _nonfinite
from ._range import scaled_queries, times_pow2
from ._compile import compiled

# Additive masks in half precision on a GPU: float16 holds no finite number below -65504, and the
# kernel's fallback (training; head sizes without a fused kernel) adds mask and logits in float16, so a
# float16 bias is clipped to +-2^14: its weight stays exp(-16384) = 0 next to any key of a normal bias,
# and a row whose visible keys all carry it still shares its weight among them (finite, never -inf).
_HALF_BIAS = 2.0**14


def attend(q, k, v, masks, *, scale, softcap=None, sinks=None, dropout=None, return_weights=False,
           return_lse=True, found=None, compile: bool = True):
    """Attention of q (B, H, T, D) to k, v (B, Hkv, S, D) under ``masks``, as :func:`mha.reference.attend`
    defines it (see the module docstring for the paths).

    Args:
        masks: the call's :class:`mha._masks.MaskSet` over (B, H, T, S).
        scale: multiplies q . k.
        softcap: c: logits l become c * tanh(l / c) before the additive mask (Gemma 2); None: off. The
            fused kernel cannot cap: such calls run unfused (or blockwise, when the scores would not fit).
        sinks: (H,) sink logits (gpt-oss): exp(sink_h) joins each row's denominator, with no value.
        dropout: a (B, H, T, S) multiplier of the weights, or None (the unfused path).
        return_weights: also return the weights (B, H, T, S) float32 (the unfused path).
        return_lse: return lse (B, H, T) float32; False (MLX only): None in its place, so that the fused
            kernel, which gives none, may run (the seam's other cores always return it).
        found, compile: passed to :func:`fused` when the fused path runs (ignored by the others): what the
            caller's scan of the projections for NaN/inf found, ``(bad, top)`` or None (found here), and
            whether to ``mx.compile`` the fused steps (False for a decode step, whose S changes each call).

    Returns:
        (context (B, H, T, D) in v's dtype, lse or None), with the weights appended when asked.
    """
    B, H, T, _ = q.shape
    big = _blockwise.over_budget(B, H, T, k.shape[2])
    if return_weights or dropout is not None or 0 in (B, T, k.shape[2]) or (not big and (return_lse or softcap)):
        out = _reference.attend(mx, q, k, v, masks, scale=scale, softcap=softcap, sinks=sinks, dropout=dropout,
                                return_weights=return_weights, acc_dtype=mx.float32)
        return out if return_weights or return_lse else (out[0], None)
    if big or return_lse or softcap is not None:
        ctx, lse = _blockwise.attention(q, k, v, scale=scale, masks=masks, softcap=softcap, sinks=sinks,
                                        return_lse=return_lse)
        return ctx.swapaxes(1, 2), lse  # (B, H, T, D), in the (B, T, H, D) memory of the output projection
    return fused(q, k, v, masks, scale=scale, sinks=sinks, found=found, compile=compile), None


def fused(q, k, v, masks, *, scale, sinks=None, found=None, compile: bool = True):
    """The fused path: (B, H, T, D) contexts in q's dtype, whose memory is laid out (B, T, H, D).

    ``sinks``: (H,) sink logits, or None. ``found``: what the caller's :mod:`mha_mlx._nonfinite` scan of the
    projections found, ``(bad, top)``: bad (B, Hkv, S), or None when the caller applies the non-finite
    rule itself (the layer does when every key is visible), and top, a bound on |k| (None: both found
    here from k and v). ``compile``: ``mx.compile`` the steps (one graph per kind of call and positions;
    ``mha_mlx.options.compile``); decoding with a cache passes False, since S grows at every step and each
    new shape would be traced anew. Only positions aligned at the end (the layer's, a cache's prefill),
    whose rule depends on T and S alone, are compiled: the graph derives them from the shapes.
    """
    bad, top = found if found is not None else (None, None)
    scan = found is None or bad is not None  # whether the rule is applied here
    arrays = {"keep": masks.keep, "bias": masks.bias, "bad": bad, "top": top, "sinks": sinks}
    given = tuple(n for n, a in arrays.items() if a is not None)
    causal, window = masks.causal, masks.window

    def fn(q, k, v, *rest):  # traced once per key below and shapes: nothing else may come from outside
        got = dict(zip(given, rest))
        rules = MaskSet.aligned(q.shape[2], k.shape[2], keep=got.get("keep"), bias=got.get("bias"), causal=causal,
                                window=window)
        return _fused(q, k, v, rules, float(scale), got.get("bad"), got.get("top"), got.get("sinks"), scan)

    if sinks is not None:
        arrays["sinks"] = mx.array(sinks)
    if not _aligned(masks):  # other positions: op by op, with the set as it is
        return _fused(q, k, v, masks, float(scale), bad, top, arrays["sinks"], scan)
    if compile:
        fn = compiled(("attend", given, causal, window, float(scale), scan), fn)
    return fn(q, k, v, *(arrays[n] for n in given))


def _fused(q, k, v, masks, scale: float, bad, top, sinks, scan: bool):
    """The fused path's steps; ``bad`` (B, Hkv, S) and ``top`` found here when None (``bad`` only when
    ``scan``)."""
    if top is None or (scan and bad is None):
        bad, top = _nonfinite.scan(k, v)  # (B, Hkv, S), and max |k|
    if scan and not masks.every_key_visible:
        k, v = _clean(k, v, bad)
    kq, kk, kv = _kernel_inputs(q, k, v)
    kq, e = scaled_queries(kq, top, scale)  # q * scale, divided by 2^e where the logits would leave float32
    if sinks is not None:  # in the logits' units, in the kernel's dtype
        sinks = times_pow2(sinks.astype(mx.float32), -e).astype(kq.dtype)
    arg, sees_any = _encode(masks, kq.dtype, e)
    out = mx.fast.scaled_dot_product_attention(kq, kk, kv, scale=1.0, mask=arg, sinks=sinks)  # (B, H, T, D)
    return _row_rules(out.astype(q.dtype), masks, bad if scan else None, sees_any, k.shape[1])


def _clean(k, v, bad):
    """Keys and values with the NaN/inf ones zeroed: a NaN at a hidden key must not leak into the kernel's
    sums (0 * NaN); the rows that see one are set to NaN by :func:`_row_rules`. (Zeroed by the flags, not
    by isfinite again: decoding runs this op by op over the whole cache, where each pass over it counts.)"""
    return mx.where(bad[..., None], 0, k), mx.where(bad[..., None], 0, v)


def _kernel_inputs(q, k, v):
    """q, k, v in the dtype MLX's kernel should compute in: half precision is widened to float32 on the
    CPU, where MLX's kernel forms the logits in the inputs' dtype (float16 overflows beyond 65504, while
    the contract is a float32 softmax) and half precision is no faster there. On a GPU the fused kernels
    accumulate the logits in float32 already, and half precision stays half."""
    if q.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return q, k, v
    return q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)


def _encode(masks, dtype, e=0):
    """The kernel's ``mask`` argument for ``masks``, and which queries see any key ((b, h, T, 1) bool;
    None: all of them).

    No rule: None, or "causal". A bool mask: False is filled by the kernel with the lowest finite logit, so
    a row that sees nothing stays finite. A bias alone: finite, it hides no key. Both: hidden keys at -inf,
    strictly below every finite bias (a user's finfo(float32).min, Hugging Face's fill, would tie with the
    lowest finite number and share a row's weight with hidden keys); a row that sees no key gets 0 instead,
    so the kernel stays finite there (no NaN in its gradients); :func:`_row_rules` sets it to 0.
    """
    T, S, bias = masks.T, masks.S, masks.bias
    if masks.keep is None and bias is None and masks.window is None and (not masks.causal or _aligned(masks)):
        return ("causal" if masks.causal else None), None
    keep = masks.visible(mx)
    sees_any = None
    if keep is not None:
        sees_any = mx.any(mx.broadcast_to(keep, tuple(keep.shape[:-2]) + (T, S)), axis=-1, keepdims=True)
    if bias is None:
        return keep, sees_any
    bias = times_pow2(bias, -e)  # in the units of the logits, which scaled_queries divided by 2^e
    if keep is None:
        return _finite_bias(bias, dtype), None
    arg = mx.where(keep, _finite_bias(bias, dtype), float("-inf"))
    return mx.where(sees_any, arg, 0).astype(dtype), sees_any


def _aligned(masks) -> bool:
    """Whether the positions are a plain call's up to a shift (query i at k_pos[0] + S - T + i, key j at
    k_pos[0] + j): the rules then depend on T and S alone, and causal is the kernel's own "causal"."""
    q, k = masks.q_pos, masks.k_pos
    return (isinstance(q, range) and isinstance(k, range) and q.step == k.step == 1
            and q.start - k.start == masks.S - masks.T)


def _finite_bias(bias, dtype):
    """A finite float32 bias as the kernel's ``dtype``, clipped to what that dtype holds finitely (so no
    large finite negative turns into a -inf that would hide its key)."""
    if dtype == mx.float32:
        return bias
    lim = _HALF_BIAS if dtype == mx.float16 else float(mx.finfo(dtype).max)
    return mx.clip(bias, -lim, lim).astype(dtype)


def _row_rules(out, masks, bad, sees_any, Hkv: int):
    """The kernel's (B, H, T, D) output with the project's rules: rows that see a key holding NaN/inf
    (``bad`` (B, Hkv, S), or None when the caller handles them) are NaN, rows that see no key are 0 (the
    kernel gives them a mean of values). Under causal alone with consecutive keys, query i sees keys
    0 .. last[i] (:meth:`mha._masks.MaskSet.last_visible`), and both rules are found per row in O(T + S).
    Applied in (B, T, H, D) order, the memory layout of the kernel's output when q is a head view of
    (B, T, H * D) projections (the layer's), so that the output projection reads it without a copy;
    returned as a (B, H, T, D) view."""
    B, H, T, D = out.shape
    S, dt = masks.S, out.dtype
    visible = sees_any  # (b, h, T, 1) or None
    last = masks.last_visible() if masks.keep is None else None  # (T,): keys 0 .. last[i] visible, or None
    if last is not None:  # rows that see no key: those before the first key (none when aligned, T <= S)
        visible = None if (last >= 0).all() else mx.array(last >= 0)[:, None]  # (T, 1)
        last = mx.array(last.astype("int32"))
    touched = None
    if bad is not None:
        bad_h = mx.repeat(bad, H // Hkv, axis=1)[:, :, None, :]  # (B, H, 1, S), head h reads kv head h // G
        if masks.every_key_visible:  # a (batch, head) that has a bad key is NaN throughout
            touched = mx.any(bad_h, axis=-1, keepdims=True)  # (B, H, 1, 1)
        elif last is not None:  # causal alone: per row
            seen = mx.cummax(bad_h.astype(mx.int8), axis=-1)  # (B, H, 1, S): a bad key at or before j
            touched = mx.take(seen, mx.maximum(last, 0), axis=-1).swapaxes(-1, -2) > 0  # (B, H, T, 1)
            touched = touched if visible is None else mx.logical_and(touched, visible)
        else:
            keep = masks.visible(mx)
            keep = mx.broadcast_to(keep, tuple(keep.shape[:-2]) + (T, S))  # (b, h, T, S)
            touched = mx.matmul(keep.astype(dt), bad_h.astype(dt).swapaxes(-1, -2)) > 0  # (B, H, T, 1)
    out = out.swapaxes(1, 2)  # (B, T, H, D)
    if touched is not None:
        out = mx.where(_to_btH(touched), mx.array(float("nan"), dt), out)
    if visible is not None:
        out = mx.where(_to_btH(visible), out, mx.array(0, dt))
    return out.swapaxes(1, 2)


def _to_btH(flags):
    """(b, h, t, 1) flags, any of them broadcast (1), to (b, t, h, 1)."""
    return flags.reshape((1,) * (4 - flags.ndim) + tuple(flags.shape)).swapaxes(1, 2)
