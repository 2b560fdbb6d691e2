"""The causal rule: query i sees keys j <= i + (S - T), aligned at the end."""

from __future__ import annotations

import numpy as np

from ..oracle import head_projections
from ._common import call, close, identical, magnitude, prefix_rows, prop, replace, rng_of, t1, t2


def _slice_masks(p, t: int) -> dict:
    masks = p.masks()
    if p.mask is not None:
        m = p.mask.reshape((1,) * (4 - p.mask.ndim) + p.mask.shape)
        masks["mask"] = m[..., : min(t, m.shape[-2]), : min(t, m.shape[-1])]
    if p.key_mask is not None:
        masks["key_mask"] = p.key_mask[:, :t]
    return masks


@prop("causal_prefix", requires=("causal",), theme="causal", self_attention=True, min_len=2, causal=True,
      positional=True)
def causal_prefix(impl, p):
    """The output at position t does not depend on inputs after t: replacing x[:, t:] by other values
    leaves y[:, :t] bitwise unchanged (self-attention, causal=True; under the empty-row convention
    "mean_value", rows that see no key average every value and are left out)."""
    rng = rng_of(p, 8)
    t = int(rng.integers(1, p.config.T))
    y, _ = call(impl, p)
    x2 = p.query.copy()
    x2[:, t:] = (3.0 * rng.normal(size=x2[:, t:].shape)).astype(x2.dtype)
    y2, _ = call(impl, p, query=x2, key=x2, value=x2)
    rows = prefix_rows(p, t)
    identical(y2[rows], y[rows], f"outputs before position {t} after changing inputs from {t} on")


@prop("causal_append", requires=("causal",), theme="causal", self_attention=True, min_len=2, causal=True,
      positional=True)
def causal_append(impl, p):
    """Appending tokens leaves earlier outputs unchanged: f(x[:, :t])[:, :t] = f(x)[:, :t] (causal; masks
    cut to the first t tokens). T2."""
    t = int(rng_of(p, 9).integers(1, p.config.T))
    y, _ = call(impl, p)
    xt = p.query[:, :t]
    sub = replace(p, config=replace(p.config, T=t, S=t))
    yt, _ = call(impl, sub, query=xt, key=xt, value=xt, masks=_slice_masks(p, t))
    rows = prefix_rows(p, t)[:, :t]
    close(yt[rows], y[:, :t][rows], t2(magnitude(p, y)), f"outputs of the first {t} tokens alone vs in the full sequence")


@prop("causal_first_token", requires=("causal",), theme="causal", self_attention=True, masks=False, causal=True)
def causal_first_token(impl, p):
    """The first token sees only itself: with causal=True, y[:, 0] = concat_h(v_{g(h)}[:, 0]) W_O^T + b_O,
    with v the projected values and g(h) the key/value head of query head h. T1."""
    y, _ = call(impl, p)
    _, _, vs = head_projections(p.weights, p.query, p.query, p.query)
    H, G = p.config.H, p.config.H // p.config.Hkv
    ctx = np.concatenate([vs[h // G][:, 0] for h in range(H)], axis=-1)  # (B, H*D)
    expected = ctx @ p.weights.o_weight.astype(np.float64).T
    if p.weights.o_bias is not None:
        expected = expected + p.weights.o_bias
    close(y[:, 0], expected, t1(magnitude(p, y)), "first token's output under the causal rule")


@prop("causal_decoding", requires=("causal", "cross"), theme="causal", self_attention=True, causal=True,
      masks=False, min_len=1, positional=True)
def causal_decoding(impl, p):
    """Bottom-right alignment is decoding with a cache: for a context c of C tokens,
    f(x, [c; x], causal) = f([c; x], [c; x], causal)[:, C:] (queries are the last T of S = C + T). T2.
    Under the causal convention "top_left" the queries are the first T instead:
    f(x, [x; c], causal) = f([x; c], [x; c], causal)[:, :T]."""
    rng = rng_of(p, 10)
    C = int(rng.integers(1, 5))
    ctx = rng.normal(size=(p.config.B, C, p.config.E)).astype(p.query.dtype)
    last = p.convention("causal") == "bottom_right"
    full = np.concatenate([ctx, p.query] if last else [p.query, ctx], axis=1)
    big = replace(p, config=replace(p.config, T=C + p.config.T, S=C + p.config.T), query=full)
    y_full, _ = call(impl, big, query=full, key=full, value=full, masks={"causal": True})
    y_part, _ = call(impl, p, query=p.query, key=full, value=full, masks={"causal": True})
    rows = slice(C, None) if last else slice(0, p.config.T)
    close(y_part, y_full[:, rows], t2(magnitude(big, y_full)),
          "decoding the last tokens vs the full causal pass" if last else "the first tokens vs the full causal pass")
