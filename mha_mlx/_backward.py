"""The MLX backend's gradients: ``mha.vjp`` as ``mx.vjp`` of the layer's own call.

The layer's parameters (its ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) and the three inputs are the
primals; the call runs with the caller's masks and options, so every feature of the forward (fused
kernel, blockwise path, masks, RoPE, window, head_mask, empty rows) is differentiated as it runs.
Dropout: ``vjp(d_out)`` replays the forward from the random key the first forward started from, so the
backward sees the same kept weights as the returned output; the layer's stream then continues from
where that forward left it.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mha import _vjp

_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}


def _sum_rows(a):
    """(N, E) -> (E,) in float32 as sums of blocks of about sqrt(N) rows, then of the blocks: a rounding
    error growing with 2 sqrt(N) rather than N (MLX sums an axis row after row, and autodiff's gradient of
    the output bias is such a sum, 4.7x torch's float32 error at B T = 26 rows)."""
    N, E = a.shape
    c = max(1, int(round(N ** 0.5)))
    pad = (-N) % c
    a = a.astype(mx.float32)
    if pad:
        a = mx.concatenate([a, mx.zeros((pad, E), mx.float32)])
    return a.reshape(-1, c, E).sum(axis=1).sum(axis=0)


def _isolated(inputs, masks):
    """The inputs to differentiate at: NaN/inf entries of query rows that see no key and of key and value
    rows that no query sees set to 0. The output does not depend on them, so neither do its gradients,
    but autodiff's weight gradients would take 0 * NaN from them."""
    xq, xk, xv = inputs
    finite = [bool(mx.all(mx.isfinite(a))) for a in inputs]
    if all(finite):
        return inputs
    B, T, S = xq.shape[0], masks.T, masks.S
    keep = masks.visible(mx)  # 4-D, broadcastable to (B, H, T, S)
    keep = mx.ones((B, 1, T, S), mx.bool_) if keep is None else mx.broadcast_to(keep, (B, keep.shape[1], T, S))
    sees = mx.any(keep, axis=(1, 3))[..., None]  # (B, T, 1)
    seen = mx.any(keep, axis=(1, 2))[..., None]  # (B, S, 1)
    out = []
    for a, ok, used in ((xq, finite[0], sees), (xk, finite[1], seen), (xv, finite[2], seen)):
        out.append(a if ok else mx.where(mx.logical_or(used, mx.isfinite(a)), a, mx.zeros((), a.dtype)))
    return out


def vjp(layer, query, key, value, call_kwargs):
    """mha.vjp on an MLX layer (see mha._vjp.vjp)."""
    call = _vjp.prepare(layer, query, key, value, call_kwargs, training=False)  # the checks; no draw
    kwargs = dict(call_kwargs)
    params = tree_flatten(layer.trainable_parameters())  # [(name, array)]
    names = [n for n, _ in params]
    inputs = [call.query, call.key, call.value]  # (B, ., .), compute dtype

    def f(*arrays):
        n = len(names)
        layer.update(tree_unflatten(list(zip(names, arrays[:n]))))
        xq, xk, xv = arrays[n:]
        if not call.batched:
            xq, xk, xv = xq[0], xk[0], xv[0]
        return layer(xq, xk, xv, **kwargs)

    primals = [a for _, a in params] + _isolated(inputs, call.masks)
    start = layer._rng.key  # the dropout stream's state before the forward
    try:
        out = f(*primals)
    finally:
        layer.update(tree_unflatten(params))
    after = layer._rng.key
    shape = tuple(out.shape)
    given = (key is not None, value is not None)

    def pull(d_out) -> _vjp.Gradients:
        d = _vjp.check_cotangent(layer, d_out, shape, call.batched)
        layer._rng.key = start
        try:
            _, grads = mx.vjp(f, primals, [d if call.batched else d[0]])
        finally:
            layer.update(tree_unflatten(params))
            layer._rng.key = after
        n = len(names)
        dparams = {f"{p}_{kind}": None for p in "qkvo" for kind in ("weight", "bias")}
        for name, g in zip(names, grads[:n]):
            if "." in name:  # a projection's weight or bias
                module, kind = name.split(".")
                dparams[f"{_NAMES[module]}_{kind}"] = g
            else:  # the layer's own parameters: q_norm, k_norm, sinks
                dparams[name] = g
        if dparams["o_bias"] is not None:  # sum(d_out) itself, summed in two levels (see _sum_rows)
            dparams["o_bias"] = _sum_rows(d.reshape(-1, d.shape[-1]))
        return _vjp.gradients(layer, call, given, tuple(grads[n:]), dparams)

    return out, pull
