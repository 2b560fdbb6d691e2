"""Gradients: what an implementation that differentiates attention must satisfy (feature "grad").

An adapter with "grad" gives ``fn.vjp(query, key, value, d_out, **call_kwargs) -> (output, grads)``,
``grads`` mapping "query", "key", "value" (each argument as a separate input) and the weight names of
mha.AttentionWeights (None for absent biases) to numpy arrays: the gradients of <d_out, output>.

Bounds (mha.testing.gradients): each gradient within 4 (e_32 + u M) of the float64 loop oracle's, e_32
the oracle's own float32 error on the same problem (FlashAttention's rule) and M the gradient's rounding
magnitude. Problems where a query sees no key are drawn only for implementations whose declared empty
row is the output bias (zero weights: zero gradients); the others define those rows otherwise.
"""

from __future__ import annotations

import numpy as np

from .. import gradients as gr
from .. import oracle
from ._common import build, prop, rng_of
from .equivariance import _permutation, _permute_mask

_WEIGHTS = gr.NAMES


def _defined(p) -> None:
    """Skip (hypothesis.assume) problems with a query that sees no key unless the implementation gives such
    rows zero weights (empty_row "output_bias"): elsewhere they are NaN or the mean of all values."""
    from hypothesis import assume

    if p.convention("empty_row") != "output_bias":
        assume(bool(p.visible().any(-1).all()))


def vjp(impl, p, d_out, *, dtype="float32", query=None, key=None, value=None, masks=None, head_mask=None):
    """(output, grads) of ``impl`` on ``p`` (overrides as for _common.call), float64 numpy arrays."""
    fn = build(impl, p, **({} if dtype == "float32" else {"dtype": dtype}))
    k0, v0 = p.kv
    q, k, v = (p.query if query is None else query), (k0 if key is None else key), (v0 if value is None else value)
    kwargs = {n: a for n, a in (p.masks() if masks is None else masks).items()
              if a is not None and not (n == "causal" and not a)}
    if head_mask is not None:
        kwargs["head_mask"] = head_mask
    cast = (lambda a: np.asarray(a, np.float64)) if dtype == "float64" else (lambda a: a)
    out, g = fn.vjp(cast(q), cast(k), cast(v), cast(d_out), **kwargs)
    missing = [n for n in ("query", "key", "value") + _WEIGHTS if n not in g]
    if missing:
        raise AssertionError(f"fn.vjp returned no gradient for {missing}")
    return np.asarray(out, np.float64), {n: None if a is None else np.asarray(a, np.float64) for n, a in g.items()}


def reference(p, d_out, *, query=None, key=None, value=None, masks=None, head_mask=None, float64=False):
    """(g64, bounds) of the loop oracle for the problem (same overrides as :func:`vjp`): per gradient
    4 (e_32 + u_32 M), or with ``float64`` 4 u_64 M (a float64 implementation's rounding)."""
    k0, v0 = p.kv
    q, k, v = (p.query if query is None else query), (k0 if key is None else key), (v0 if value is None else value)
    m = p.masks() if masks is None else {n: a for n, a in masks.items() if a is not None}
    opts = dict(m, head_mask=head_mask, causal_align=p.convention("causal"), **p.layer_options())
    _, g64 = gr.oracle_vjp(p.weights, q, k, v, d_out, **opts)
    _, P = oracle.attention(p.weights, q, k, v, **m, causal_align=p.convention("causal"), **p.layer_options())
    M = gr.magnitudes(p.weights, q, k, v, d_out, P, mask=m.get("mask"), head_mask=head_mask,
                      max_angle=p.max_angle(), qk_norm=p.layer_options().get("qk_norm"))
    if float64:
        return g64, {n: gr.FACTOR * 2.0**-53 * M[n] for n in M}
    _, g32 = gr.oracle_vjp(p.weights, q, k, v, d_out, dtype=np.float32, **opts)
    return g64, gr.tolerances(g32, g64, M)


def _cotangent(p, salt: int = 40) -> np.ndarray:
    c = p.config
    return rng_of(p, salt).normal(size=(c.B, c.T, c.E)).astype(np.float32)


def _head_mask(impl, p):
    """Half of the time, for implementations with "head_mask": multipliers in [-1, 2] with a zero."""
    rng = rng_of(p, 41)
    if "head_mask" not in impl.features or rng.random() < 0.5:
        return None
    c = rng.uniform(-1.0, 2.0, size=p.config.H).astype(np.float32)
    c[rng.integers(p.config.H)] = 0.0
    return c


@prop("grad_reference", requires=("grad",), theme="gradients", positional=True)
def grad_reference(impl, p):
    """The gradient of <c, y> for every input and weight equals the float64 loop oracle's (the softmax's
    Jacobian diag(p) - p p^T built whole, GQA groups summed, RoPE transposed): |g - g_64| <= 4 (e_32 + u M)
    per gradient, e_32 the oracle's own float32 error (FlashAttention's rule), M its rounding magnitude
    (mha.testing.gradients). A cotangent c ~ N(0, 1); head_mask too when declared."""
    _defined(p)
    c, hm = _cotangent(p), _head_mask(impl, p)
    _, g = vjp(impl, p, c, head_mask=hm)
    g64, tol = reference(p, c, head_mask=hm)
    gr.assert_gradients_close(g, g64, tol, "vs float64 oracle:")


@prop("grad_directional", requires=("grad",), theme="gradients", positional=True, modes=("normal", "ties"))
def grad_directional(impl, p):
    """JAX's check_vjp: for a random direction t over every input and weight, <c, J t> by central
    differences of the float64 oracle's forward (eps 1e-4) equals <J^T c, t> from the gradients, computed
    in float64 when the implementation offers it, else in float32: within sum_z |t_z| . bound_z (float32:
    grad_reference's bound; float64: 4 u_64 M) plus 1e-6 of the terms' size, plus twice the gap between
    the differences at steps 1e-4 and 2e-4 (the differences' own error: with an additive mask of -1e9 each
    logit carries ~1e-7 of rounding, which a step of 1e-4 turns into ~1e-3). Independent of the gradient
    oracle: only the forward's semantics is trusted."""
    _defined(p)
    c = _cotangent(p, 42)
    f64 = "float64" in getattr(impl, "dtypes", ())
    _, g = vjp(impl, p, c, dtype="float64" if f64 else "float32")
    k0, v0 = p.kv
    primals = {**{n: None if a is None else np.asarray(a, np.float64) for n, a in p.weights.to_dict().items()},
               "query": p.query.astype(np.float64), "key": np.asarray(k0, np.float64),
               "value": np.asarray(v0, np.float64), "__cotangent__": c.astype(np.float64)}
    weights = p.weights

    def forward(x):
        w = type(weights)(**{n: x[n] for n in _WEIGHTS}, num_heads=weights.num_heads,
                          num_kv_heads=weights.num_kv_heads)
        return oracle.attention(w, x["query"], x["key"], x["value"], **p.masks(), **p.oracle_options())[0]

    fd, an, size = gr.directional(forward, g, primals, rng_of(p, 43))
    fd2, _, _ = gr.directional(forward, g, primals, rng_of(p, 43), eps=2e-4)  # the same direction, twice the step
    t_rng = rng_of(p, 43)  # the same directions again, to weigh each gradient's bound by them
    _, bounds = reference(p, c, float64=f64)
    tol = sum(bounds[n] * np.abs(t_rng.normal(size=np.shape(primals[n]))).sum()
              for n in primals if n != "__cotangent__" and primals[n] is not None) + 1e-6 * (size + abs(fd))
    tol += 2 * abs(fd - fd2)  # the differences' own error where it is larger: a -1e9 mask rounds each logit to ~1e-7
    if not abs(fd - an) <= tol:
        raise AssertionError(f"<c, J t> = {fd:.9g} by central differences of the float64 oracle, but "
                             f"<J^T c, t> = {an:.9g} from the gradients (|difference| {abs(fd - an):.3g} > {tol:.3g})")


@prop("grad_permutation", requires=("grad",), theme="gradients", min_len=2, causal=False)
def grad_permutation(impl, p):
    """Gradients are equivariant under permutations: permuting the queries (with the mask's query axis
    and the cotangent's rows) permutes g.query's rows, permuting the keys with their values (mask's key
    axis, key_mask) permutes g.key's and g.value's, and the weights' gradients do not move. Self-attention:
    one permutation of the tokens for all three. Within twice grad_reference's bound."""
    _defined(p)
    rng = rng_of(p, 44)
    cfg = p.config
    pt = _permutation(rng, cfg.T)
    ps = pt if cfg.self_attention else _permutation(rng, cfg.S)
    c = _cotangent(p)
    _, g = vjp(impl, p, c)
    k, v = p.kv
    q2 = p.query[:, pt]
    k2, v2 = (q2, q2) if cfg.self_attention else (k[:, ps], v[:, ps])
    masks = p.masks()
    masks["mask"] = None if p.mask is None else _permute_mask(_permute_mask(p.mask, pt, (-2,)), ps, (-1,))
    masks["key_mask"] = None if p.key_mask is None else p.key_mask[:, ps]
    _, g2 = vjp(impl, p, c[:, pt], query=q2, key=k2, value=v2, masks=masks)
    _, tol = reference(p, c)
    expected = dict(g, query=g["query"][:, pt], key=g["key"][:, ps], value=g["value"][:, ps])
    gr.assert_gradients_close(g2, expected, {n: 2 * t for n, t in tol.items()}, "permuted:")


@prop("grad_hidden_keys", requires=("grad", "cross"), requires_any=("key_mask", "mask"), theme="gradients",
      self_attention=False)
def grad_hidden_keys(impl, p):
    """A key hidden from every query gets exactly zero gradient (g.key and g.value rows 0), and so does a
    query that sees no key (g.query row 0, for implementations whose empty rows output the bias). With
    nonfinite "isolated": NaN at those hidden keys and values leaves every gradient finite and equal
    to the finite problem's within twice grad_reference's bound."""
    _defined(p)
    rng = rng_of(p, 45)
    cfg = p.config
    b, j = int(rng.integers(cfg.B)), int(rng.integers(cfg.S))
    masks = p.masks()
    if "key_mask" in impl.features:
        km = np.ones((cfg.B, cfg.S), bool) if p.key_mask is None else p.key_mask.copy()
        km[b, j] = False
        masks["key_mask"] = km
    else:
        m = np.ones((cfg.B, 1, 1, cfg.S), bool)
        m[b, ..., j] = False
        masks["mask"] = m if p.mask is None else _and(p.mask, m)
    if p.convention("empty_row") != "output_bias":
        from hypothesis import assume

        assume(bool(_visible(p, masks).any(-1).all()))
    c = _cotangent(p)
    _, g = vjp(impl, p, c, masks=masks)
    hidden = ~_visible(p, masks).any(axis=(1, 2))  # (B, S): keys no query sees
    for n in ("key", "value"):
        rows = g[n][hidden]
        if rows.size and np.any(rows != 0):
            raise AssertionError(f"g.{n} is not 0 at keys no query sees: max |g| {np.abs(rows).max():.3g}")
    if p.convention("empty_row") == "output_bias":
        empty = ~_visible(p, masks).any(axis=(1, 3))  # (B, T): queries that see no key in any head
        if empty.any() and np.any(g["query"][empty] != 0):
            raise AssertionError("g.query is not 0 at a query that sees no key")
    if p.convention("nonfinite") != "isolated" or not hidden.any():
        return
    k, v = p.kv
    k2, v2 = k.copy(), v.copy()
    k2[hidden], v2[hidden] = np.nan, np.inf
    _, g2 = vjp(impl, p, c, key=k2, value=v2, masks=masks)
    _, tol = reference(p, c, masks=masks)
    gr.assert_gradients_close(g2, g, {n: 2 * t for n, t in tol.items()}, "NaN at hidden keys:")


def _and(mask, keep):
    """A problem's mask AND a bool keep (B, 1, 1, S): bool masks combined, float masks -inf where hidden."""
    m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if m.dtype.kind == "f":
        return np.where(keep, m, -np.inf).astype(m.dtype)
    return (m != 0) & keep


def _visible(p, masks) -> np.ndarray:
    c = p.config
    return oracle.visible_keys(c.B, c.H, c.T, c.S, mask=masks.get("mask"), key_mask=masks.get("key_mask"),
                               causal=bool(masks.get("causal")), window=p.window,
                               causal_align=p.convention("causal"))
