r"""``mha.vjp``: the layer's output and a function that pulls a cotangent back to every input and parameter.

For :math:`y = \mathrm{MHA}_\theta(x_q, x_k, x_v)` and a cotangent :math:`\bar y` of y's shape,
``vjp(d_out)`` returns :math:`\bar y^\top \partial y / \partial z` for each input z and each parameter in
:math:`\theta` (the four projections' weights and biases): the gradient of :math:`\langle \bar y, y\rangle`.

Each backend computes it its own way behind this one front end: numpy analytically (mha_cpu._backward,
from the forward's log-sum-exp, blockwise), MLX by ``mx.vjp`` of its own layer (mha_mlx._backward). The
front end checks every argument once, before any work, and refuses what has no gradient here: a
``cache`` (decoding), ``return_weights`` and ``return_lse`` (the cotangent is of the output alone).

How it differs from autograd frameworks: the function is pure in the weights (nothing is accumulated
into the layer; the caller applies an update, e.g. with :class:`mha.training.Adam`), and a query with
no visible key gets zero gradients, never NaN.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from . import _prepare
from ._backends import to_numpy
from ._layer import MultiHeadAttention
from ._weights import AttentionWeights

CALL_ARGUMENTS = ("mask", "key_mask", "causal", "head_mask", "training", "check_finite")
NO_GRADIENT = {
    "cache": "decoding with a cache has no gradient here; call mha.vjp on the whole sequence (causal=True)",
    "return_weights": "the weights have no cotangent in mha.vjp (it pulls back the output's alone); "
                      "call the layer with return_weights=True for them",
    "return_lse": "the log-sum-exp has no cotangent in mha.vjp (it pulls back the output's alone)",
}
_BACKWARD = {"numpy": "mha_cpu._backward", "mlx": "mha_mlx._backward"}


@dataclass(frozen=True)
class Gradients:
    """What ``vjp(d_out)`` returns.

    query: (B, T, E), the gradient of the query argument (with key and value omitted, of the one input in
        all three roles); key: (B, S, kdim) (with value omitted, in both the key and value roles);
        value: (B, S, vdim); each None when the argument was not given, and unbatched when the input was.
        Native arrays of the layer's backend, in its compute dtype.
    weights: an :class:`mha.AttentionWeights` of the gradients of every weight and bias (numpy arrays).
    """

    query: object
    key: object
    value: object
    weights: AttentionWeights


def vjp(layer, query, key=None, value=None, **call_kwargs):
    """``(out, vjp)``: ``out = layer(query, key, value, **call_kwargs)`` and ``vjp(d_out) -> Gradients``.

    Args:
        layer: an :class:`mha.MultiHeadAttention` (either backend).
        query, key, value: as for the layer's call (key defaults to query, value to key).
        call_kwargs: ``mask``, ``key_mask``, ``causal``, ``head_mask``, ``training``, ``check_finite``, as
            for the layer's call (masks and head_mask are constants: they get no gradient). With
            ``training=True`` and dropout, one dropout draw serves the forward and the backward.

    Returns:
        out, the output as the layer returns it ((B, T, E) or unbatched), and ``vjp(d_out)``: ``d_out``
        of out's shape, any real float dtype, finite; returns :class:`Gradients`. It may be called any
        number of times (the pull-back is linear in d_out).

    Raises:
        TypeError/ValueError before any work, naming the argument: a layer that is not an
        mha.MultiHeadAttention, an unknown keyword, a call feature without gradient (``cache``,
        ``return_weights``, ``return_lse``), any input the layer's call would refuse; and from ``vjp``: a
        cotangent of the wrong shape or dtype or holding NaN/inf.
    """
    if not isinstance(layer, MultiHeadAttention):
        raise TypeError(f"mha.vjp needs an mha.MultiHeadAttention layer, got {type(layer).__name__}")
    for name, why in NO_GRADIENT.items():
        given = call_kwargs.pop(name, None)
        if given is not None and given is not False:
            raise ValueError(f"mha.vjp: {name}={given!r} has no gradient: {why}")
    unknown = sorted(set(call_kwargs) - set(CALL_ARGUMENTS))
    if unknown:
        raise TypeError(f"mha.vjp got unexpected keyword arguments {unknown}; it takes the layer call's "
                        f"{', '.join(CALL_ARGUMENTS)}")
    backend = importlib.import_module(_BACKWARD[layer.backend])
    return backend.vjp(layer, query, key, value, call_kwargs)


def prepare(layer, query, key, value, call_kwargs, *, training=None) -> _prepare.Prepared:
    """The layer's own front end on one call (every check, before any work); ``training`` overrides."""
    kw = dict(call_kwargs)
    if training is not None:
        kw["training"] = training
    return _prepare.prepare(layer, query, key, value, mask=kw.get("mask"), key_mask=kw.get("key_mask"),
                            causal=kw.get("causal", False), head_mask=kw.get("head_mask"),
                            return_weights=False, training=kw.get("training", False),
                            check_finite=kw.get("check_finite", False), return_lse=False, cache=None)


def check_cotangent(layer, d_out, shape: tuple, batched: bool):
    """``d_out`` as a batched native array in the layer's compute dtype, checked: real floats, ``shape``
    (out's), finite. ``shape`` is out's shape as returned (unbatched when the input was)."""
    if not layer._is_native(d_out):
        try:
            d_out = to_numpy(d_out)
        except ValueError as err:
            raise ValueError(f"d_out must be an array of shape {shape}: {err}") from None
    kind = getattr(getattr(d_out, "dtype", None), "kind", None)
    if kind is None:  # an mx.array: its dtype has no numpy kind
        kind = "f" if "float" in str(d_out.dtype) else "?"
    if kind != "f":
        raise TypeError(f"d_out must hold real floats (the cotangent of the output), got dtype {d_out.dtype}")
    if tuple(d_out.shape) != tuple(shape):
        raise ValueError(f"d_out must have the output's shape {tuple(shape)} (B, T, E), got {tuple(d_out.shape)}")
    xp = layer._xp
    if not bool(xp.all(xp.isfinite(d_out))):
        raise ValueError("d_out holds NaN or inf; a cotangent must be finite")
    if not layer._is_native(d_out):
        d_out = layer._from_numpy(np.ascontiguousarray(d_out))
    dt = layer._dtypes()[0]
    d_out = d_out if d_out.dtype == dt else d_out.astype(dt)
    return d_out if batched else d_out[None]


def gradients(layer, call: _prepare.Prepared, given: tuple, dx: tuple, dparams: dict) -> Gradients:
    """Package the backward's results: ``given`` says which of key/value the caller passed; ``dx`` the
    (B, ·, ·) gradients of the query, key and value roles (native); ``dparams`` the parameters'
    gradients by AttentionWeights name (native or numpy, None for absent biases)."""
    dq, dk, dv = dx
    key_given, value_given = given
    if not key_given:  # one input in all three roles (dk, dv None: the backward summed them already)
        dq, dk, dv = (dq if dk is None else dq + dk + dv), None, None
    elif not value_given:  # key in both the key and value roles
        dk, dv = dk + dv, None
    if not call.batched:
        dq, dk, dv = (None if a is None else a[0] for a in (dq, dk, dv))
    w = AttentionWeights(**{n: None if a is None else to_numpy(a) for n, a in dparams.items()},
                         num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads)  # with q_norm/k_norm/sinks
    return Gradients(dq, dk, dv, w)
