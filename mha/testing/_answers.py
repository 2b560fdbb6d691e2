"""Checking one answer of an implementation against the adapter protocol (see mha.testing._guard)."""

from __future__ import annotations

import numpy as np


class ImplementationError(AssertionError):
    """An implementation broke the adapter protocol: a malformed answer, or no answer in time."""


class Malformed(ImplementationError):
    """An answer of the wrong kind (None, a scalar, a wrong shape or dtype): run_property stops at the
    first one instead of shrinking it (the shape of a problem rarely explains such an answer)."""


class Unreadable:
    """An MLX answer that could not be read into numpy (on its own thread); the checks report it."""

    def __init__(self, x, err):
        self.what, self.err = _describe(x), err


def _describe(x) -> str:
    """What an answer is, in a few words: None, a float, a complex64 array of shape (2, 3, 8)..."""
    if x is None:
        return "None"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return f"{type(x).__name__} {x!r}"
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(x).__module__.split('.')[0]}.{type(x).__name__} of dtype {dtype} and shape {tuple(shape)}"
    return f"a {type(x).__name__}"


def _numpy(x, name: str, what: str):
    """``x`` as a numpy array (numpy, torch tensor; MLX arrays arrive read), or Malformed."""
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
        raise Malformed(f"{name} returned {_describe(x)} as {what}")
    if isinstance(x, Unreadable):
        raise Malformed(f"{name} returned {x.what} as {what}, which numpy cannot read "
                        f"({type(x.err).__name__}: {x.err})")
    try:
        return np.asarray(x)
    except Exception as err:  # noqa: BLE001 - any conversion failure is the implementation's answer
        raise Malformed(f"{name} returned {_describe(x)} as {what}, which numpy cannot read "
                        f"({type(err).__name__}: {err})") from None


def _real_float(a) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def _expect(name, a, shape, what):
    """ImplementationError unless ``a`` is a real floating array of ``shape`` (None entries: any size)."""
    fits = a.ndim == len(shape) and all(s is None or s == n for s, n in zip(shape, a.shape))
    if not fits or not _real_float(a):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        got = f"{a.dtype} array of shape {a.shape}" if a.ndim else f"a 0-d {a.dtype} array"
        raise Malformed(f"{name} returned {got} as {what}, expected {want} real float")


def check_answer(guard, res, weights, options, query, key, value, kwargs):
    """``res`` as numpy arrays (output, or (output, weights) with ``return_weights``) after checking shape,
    dtype and finiteness; ImplementationError naming the implementation otherwise."""
    name = guard.name
    q = np.shape(query)
    lead = q[:-1]  # (B, T) or (T,)
    S = None if key is None else np.shape(key)[-2]
    out_shape = lead + (weights.embed_dim,)
    if kwargs.get("return_weights"):
        if not isinstance(res, (tuple, list)) or len(res) != 2:
            raise Malformed(f"{name} returned {_describe(res)} for return_weights=True, expected a pair "
                                      f"(output, weights)")
        y, P = _numpy(res[0], name, "its output"), _numpy(res[1], name, "its weights")
        _expect(name, y, out_shape, "its output")
        widths = [S]
        if getattr(weights, "sinks", None) is not None and S is not None:
            # learned sinks: the weights may carry the sink's share as a last column (convention sink_weights
            # "column"); a probe for unknown conventions (finite="any") takes either form
            column = guard.declared.get("sink_weights") == "column"
            widths = [S + 1] if column and guard.finite != "any" else [S, S + 1] if guard.finite == "any" else [S]
        width = P.shape[-1] if P.ndim and P.shape[-1] in widths else widths[0]
        _expect(name, P, lead[:-1] + (weights.num_heads, lead[-1], width), "its weights")
    else:
        y, P = _numpy(res, name, "its output"), None
        _expect(name, y, out_shape, "its output")
    if guard.finite is not None:
        rows = _finite_rows(guard, weights, options, query, key, value, kwargs, y.dtype)
        if rows is not None:
            _finite(name, y, rows, "its output", out_shape)
            if P is not None:
                _finite(name, P, np.expand_dims(rows, -2) if P.ndim == y.ndim + 1 else rows, "its weights", P.shape)
    return (y, P) if P is not None else y


def _finite(name, a, rows, what, shape):
    bad = ~np.isfinite(a) & np.broadcast_to(rows.reshape(rows.shape + (1,) * (a.ndim - rows.ndim)), a.shape)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ImplementationError(
            f"{name} returned {a[first]!r} at {first} of {what} ({int(bad.sum())} of {bad.size} entries not finite) "
            f"for finite inputs whose answer is finite there; expected {tuple(shape)} real float, finite")


def _all_finite(*arrays) -> bool:
    return all(a is None or np.isfinite(np.asarray(a, np.float64)).all() for a in arrays)


def _finite_rows(guard, weights, options, query, key, value, kwargs, dtype):
    """(B, T) (or (T,)) bool: the rows that must be finite, or None when nothing is promised (a
    non-finite input, an output bound near the dtype's limit, or a cached call whose keys are unseen)."""
    if kwargs.get("cache") is not None:  # the keys and values of earlier calls are in play, unseen here
        return None
    mask = kwargs.get("mask")
    if mask is not None and np.asarray(mask).dtype.kind == "f":
        m = np.asarray(mask, np.float64)
        if np.isnan(m).any() or np.isposinf(m).any():
            return None
    head_mask = kwargs.get("head_mask")
    if not _all_finite(query, key, value, head_mask):
        return None
    v = query if value is None else value
    if _bound(weights, v, head_mask) > 0.25 * float(np.finfo(dtype).max if dtype.kind == "f" else np.finfo(np.float32).max):
        return None
    lead = np.shape(query)[:-1]
    empty_row = guard.declared["empty_row"] if guard.finite == "declared" else "unspecified"
    if empty_row in ("output_bias", "mean_value"):
        return np.ones(lead, bool)
    if key is None:
        return None
    return _seeing_rows(guard, weights, options, query, key, kwargs)


def _bound(weights, value, head_mask) -> float:
    """The largest |output| any attention weights can give: |b_O| + ||W_O||_inf max |v_proj|."""
    w = {n: None if a is None else np.abs(np.asarray(a, np.float64)) for n, a in weights.to_dict().items()}
    v = np.abs(np.asarray(value, np.float64)).reshape(-1, np.shape(value)[-1]) @ w["v_weight"].T
    vmax = float(v.max(initial=0.0)) + (0.0 if w["v_bias"] is None else float(w["v_bias"].max(initial=0.0)))
    wo = float(w["o_weight"].sum(axis=1).max(initial=0.0))
    if head_mask is not None:
        wo *= float(np.abs(np.asarray(head_mask, np.float64)).max(initial=0.0))
    return (0.0 if w["o_bias"] is None else float(w["o_bias"].max(initial=0.0))) + wo * vmax


def _seeing_rows(guard, weights, options, query, key, kwargs):
    """Rows whose query sees at least one key in every head (under either causal alignment unless the
    conventions are the declared ones)."""
    from .oracle import visible_keys

    batched = np.ndim(query) == 3
    B = np.shape(query)[0] if batched else 1
    T, S, H = np.shape(query)[-2], np.shape(key)[-2], weights.num_heads
    aligns = [guard.declared["causal"]] if guard.finite == "declared" else ["bottom_right", "top_left"]
    rows = np.ones((B, T), bool)
    for align in aligns:
        km = kwargs.get("key_mask")
        vis = visible_keys(B, H, T, S, mask=kwargs.get("mask"), key_mask=None if km is None else np.reshape(km, (B, S)),
                           causal=bool(kwargs.get("causal")), window=options.get("window"), causal_align=align)
        rows &= vis.any(-1).all(1)
    return rows if batched else rows[0]
