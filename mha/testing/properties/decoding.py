"""Decoding: the key/value cache, rotary positions and sliding windows.

Positions follow the causal rule's alignment: query i of T sits at position (S - T) + i, key j at j;
with a cache, new tokens continue from the number of positions appended so far.
"""

from __future__ import annotations

import numpy as np

from .. import oracle
from ._common import build, call, close, identical, magnitude, prop, replace, rng_of, t1, t2, weights_tol


def _chunks(rng, T: int) -> list[tuple[int, int]]:
    """Split 0..T into consecutive chunks: a prefill of random length, then mostly single tokens."""
    bounds, t = [0], int(rng.integers(1, T + 1)) if rng.random() < 0.6 else 1
    bounds.append(t)
    while t < T:
        t = min(T, t + (1 if rng.random() < 0.7 else int(rng.integers(2, 4))))
        bounds.append(t)
    return list(zip(bounds[:-1], bounds[1:]))


def _left_padding(rng, B: int, T: int) -> np.ndarray:
    """(B, T) bool, False for each row's first pads tokens (a left-padded batch)."""
    pads = rng.integers(0, T, size=B)
    return np.arange(T)[None, :] >= pads[:, None]


@prop("cached_decoding", requires=("cache", "causal"), theme="decoding", self_attention=True, causal=True,
      masks=False, min_len=2, max_len=12, positional=True)
def cached_decoding(impl, p):
    """Decoding with a cache equals one causal pass: feeding x in chunks (a prefill, then mostly one
    token at a time) through ``fn(x[:, a:b], cache=c, causal=True)`` gives f(x, causal=True) row for
    row (T2), with the layer's RoPE and window, GQA, and left padding (key_mask) when supported, given
    with a chunk that holds pads and, as often as not, left out when it holds none (the cache must
    remember the padding it stored); a windowed layer's cache keeps only the last window - 1 positions."""
    rng = rng_of(p, 30)
    B, T = p.config.B, p.config.T
    km = _left_padding(rng, B, T) if "key_mask" in impl.features and rng.random() < 0.5 else None
    masks = {"causal": True} if km is None else {"causal": True, "key_mask": km}
    y, _ = call(impl, p, masks=masks)
    fn = build(impl, p)
    cache = fn.init_cache(B, [None, T, T + 3][int(rng.integers(3))])
    parts = []
    for a, b in _chunks(rng, T):
        kwargs = {"cache": cache, "causal": True}
        if km is not None and (not km[:, a:b].all() or rng.random() < 0.5):  # no pad among the new
            kwargs["key_mask"] = km[:, a:b]  # tokens: as often as not left out, as generation loops do
        parts.append(np.asarray(fn(p.query[:, a:b], None, None, **kwargs), np.float64))
    close(np.concatenate(parts, axis=1), y, t2(magnitude(p, y)), "cached decoding vs one causal pass")


@prop("cached_decoding_nonfinite", requires=("cache", "causal"), theme="decoding", self_attention=True,
      causal=True, masks=False, min_len=2, max_len=12, positional=True)
def cached_decoding_nonfinite(impl, p):
    """Decoding with a cache, NaN, +inf or -inf in one feature of one token: the rows that see that token
    (its own, and the later ones its window reaches) are NaN, and every other row, before and after it,
    is finite and equals one clean causal pass (T2): a non-finite key or value stays isolated once
    cached, whichever path (prefill, single-token step, chunk) appends or reads it; and a later token
    whose mask hides it stays finite (the cache must remember that it holds one). Under the nonfinite
    convention "propagates", only the other batch elements are checked."""
    rng = rng_of(p, 31)
    B, T = p.config.B, p.config.T
    b, j, feature = int(rng.integers(B)), int(rng.integers(T)), int(rng.integers(p.config.E))
    y, _ = call(impl, p, masks={"causal": True})
    isolated = p.convention("nonfinite") == "isolated"
    seeing = np.zeros((B, T), bool)  # rows that may see token j; "propagates": all of batch element b
    seeing[b] = oracle.visible_keys(B, 1, T, T, causal=True, window=p.window)[b, 0, :, j] if isolated else True
    chunks = _chunks(rng, T)
    tol = t2(magnitude(p, y))
    for bad in (np.nan, np.inf, -np.inf):
        x = p.query.copy()
        x[b, j, feature] = bad
        fn = build(impl, p)
        cache = fn.init_cache(B, None)
        out = np.concatenate([np.asarray(fn(x[:, a:e], None, None, cache=cache, causal=True), np.float64)
                              for a, e in chunks], axis=1)
        if isolated and np.isfinite(out[seeing]).any():
            raise AssertionError(f"a row that sees token {j} ({bad} in its input) stayed (partly) finite")
        if not np.isfinite(out[~seeing]).all():
            raise AssertionError(f"a row that cannot see token {j} ({bad} in its input) is not finite")
        close(out[~seeing], y[~seeing], tol, f"rows that cannot see token {j} with {bad}, decoded in {chunks}")
        if isolated and "mask" in impl.features and p.window is None:  # one more token, hiding token j
            last = np.ones((B, 1, T + 1, T + 1), bool)
            last[b, :, T, j] = False
            z = np.concatenate([p.query, p.query[:, :1] * 0.5], axis=1)
            ref = np.asarray(fn(z, None, None, mask=last & np.tri(T + 1, dtype=bool), causal=True), np.float64)
            got = np.asarray(fn(z[:, T:], None, None, cache=cache, causal=True, mask=last[:, :, T:]), np.float64)
            if not np.isfinite(got[b]).all():
                raise AssertionError(f"a later token whose mask hides the cached token {j} ({bad}) is not finite")
            close(got[b], ref[b, T:], tol, f"a later token whose mask hides the cached token {j} ({bad})")


@prop("rope_reference", requires=("rope",), theme="decoding", rope=True, positional=True, min_head_dim=4,
      min_len=2)
def rope_reference(impl, p):
    """RoPE rotates as the oracle's complex multiplication does (the pair layout, frequencies, position
    scale and offsets): with RoPE on every example and heads wide enough that the two pair layouts
    differ, y equals the float64 oracle within T1 (relative positions alone, as the next property
    checks, cannot tell one valid layout from the other)."""
    y, _ = call(impl, p)
    k, v = p.kv
    y_ref, _ = oracle.attention(p.weights, p.query, k, v, **p.masks(), **p.oracle_options())
    close(y, y_ref, t1(magnitude(p, y_ref)), f"output with {p.rope} vs float64 oracle")


@prop("rope_relative_positions", requires=("rope", "key_mask"), theme="decoding", rope=True, positional=True,
      masks=False, min_head_dim=2)
def rope_relative_positions(impl, p):
    """RoPE makes the logits depend only on relative position: shifting every position by P (prepending P
    tokens of noise that key_mask hides) leaves the outputs of the other tokens unchanged (T2), with
    causal or not, cross-attention included."""
    rng = rng_of(p, 31)
    c = p.config
    P = int(rng.integers(1, 6))
    causal = "causal" in impl.features and bool(rng.integers(2))
    km = np.ones((c.B, c.S), bool) if rng.random() < 0.5 else rng.random((c.B, c.S)) < 0.8
    y, _ = call(impl, p, masks={"key_mask": km, "causal": causal})

    def pad(x):
        return np.concatenate([(3.0 * rng.normal(size=(c.B, P, x.shape[-1]))).astype(x.dtype), x], axis=1)

    k, v = p.kv
    qp = pad(p.query) if c.self_attention else p.query
    kp, vp = (qp, qp) if c.self_attention else (pad(k), pad(v))
    Tq = c.T + P if c.self_attention else c.T
    big = replace(p, config=replace(p.config, T=Tq, S=c.S + P), query=qp, key=None if c.self_attention else kp,
                  value=None if c.self_attention else vp)
    km_p = np.concatenate([np.zeros((c.B, P), bool), km], axis=1)
    y_p, _ = call(impl, big, query=qp, key=kp, value=vp, masks={"key_mask": km_p, "causal": causal})
    close(y_p[:, Tq - c.T:], y, t2(magnitude(big, y)), f"outputs with every position shifted by {P}")


@prop("window_wide_is_plain", requires=("window",), theme="decoding", window=True, positional=True)
def window_wide_is_plain(impl, p):
    """A window at least as wide as the sequence changes nothing: window = W >= max(T, S) gives the
    output (and weights) of the layer without a window (T2)."""
    W = max(p.config.T, p.config.S) + int(rng_of(p, 32).integers(0, 3))
    rw = "weights" in impl.features
    y, P = call(impl, replace(p, window=W), return_weights=rw)
    y0, P0 = call(impl, replace(p, window=None), return_weights=rw)
    close(y, y0, t2(magnitude(p, y0)), f"window={W} vs no window")
    if rw:
        close(P, P0, weights_tol(p), f"weights with window={W} vs no window")


@prop("window_is_band_mask", requires=("window", "mask"), theme="decoding", window=True, positional=True)
def window_is_band_mask(impl, p):
    """The window is a band mask ANDed with the others: a layer with window W equals the layer without
    it given the bool mask |i + (S - T) - j| < W on top of the problem's masks (T2); with "weights", the
    keys outside the band get exactly zero weight."""
    c = p.config
    dist = np.arange(c.T)[:, None] + (c.S - c.T) - np.arange(c.S)[None, :]  # (T, S)
    band = np.abs(dist) < p.window
    m = band[None, None] if p.mask is None else _and(p.mask, band)
    rw = "weights" in impl.features
    y, P = call(impl, p, return_weights=rw)
    masks = dict(p.masks())
    masks["mask"] = m
    y0, P0 = call(impl, replace(p, window=None, mask=m), masks=masks, return_weights=rw)
    close(y, y0, t2(magnitude(p, y0)), f"window={p.window} vs the band as a mask")
    if rw:
        outside = np.broadcast_to(~band, P.shape)
        identical(P[outside], np.zeros(int(outside.sum())), "weights outside the window")
        close(P, P0, weights_tol(p), f"weights with window={p.window} vs the band as a mask")


def _and(mask, band):
    """The problem's mask (bool, int or additive float) with the band's hidden entries hidden too."""
    m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if m.dtype.kind == "f":
        return np.where(band, m, -np.inf).astype(m.dtype)
    return (m != 0) & band
