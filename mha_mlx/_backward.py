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

    primals = [a for _, a in params] + inputs
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
            module, kind = name.split(".")
            dparams[f"{_NAMES[module]}_{kind}"] = g
        return _vjp.gradients(layer, call, given, tuple(grads[n:]), dparams)

    return out, pull
