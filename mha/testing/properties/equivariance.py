"""Symmetries: permuting tokens, permuting keys with their values, splitting the batch."""

from __future__ import annotations

import numpy as np

from ._common import call, close, magnitude, prop, replace, rng_of, t2, weights_tol


def _permutation(rng, n: int) -> np.ndarray:
    """A random permutation that is not the identity (n >= 2); never just a flip or a roll by design."""
    while True:
        p = rng.permutation(n)
        if n < 2 or not np.array_equal(p, np.arange(n)):
            return p


def _permute_mask(mask, perm, axes):
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    for ax in axes:
        if m.shape[ax] > 1:
            m = np.take(m, perm, axis=ax)
    return m


@prop("permutation_equivariance", theme="equivariance", self_attention=True, min_len=2, causal=False)
def permutation_equivariance(impl, p):
    """Self-attention commutes with token permutations: f(x[pi]; M[pi][:, pi], km[pi]) = f(x)[pi].

    For a random non-identity permutation pi of the T tokens, with the mask permuted on both its query
    and key axes and key_mask on its key axis. With "weights" also P' = P[..., pi, :][..., pi]. T2.
    """
    perm = _permutation(rng_of(p, 1), p.config.T)
    rw = "weights" in impl.features
    y, P = call(impl, p, return_weights=rw)
    q2 = p.query[:, perm]
    masks = p.masks()
    masks["mask"] = _permute_mask(p.mask, perm, (-2, -1))
    masks["key_mask"] = None if p.key_mask is None else p.key_mask[:, perm]
    y2, P2 = call(impl, p, query=q2, key=q2, value=q2, masks=masks, return_weights=rw)
    M = magnitude(p, y)
    close(y2, y[:, perm], t2(M), "permuted output")
    if rw:
        close(P2, P[:, :, perm][..., perm], weights_tol(p), "permuted weights")


@prop("kv_permutation_invariance", requires=("cross",), theme="equivariance", self_attention=False, min_len=2,
      causal=False)
def kv_permutation_invariance(impl, p):
    """Cross-attention is invariant to permuting keys together with their values:
    f(x, k[sigma], v[sigma]; M[..., sigma], km[sigma]) = f(x, k, v), and P' = P[..., sigma]. T2."""
    sigma = _permutation(rng_of(p, 2), p.config.S)
    rw = "weights" in impl.features
    y, P = call(impl, p, return_weights=rw)
    k, v = p.kv
    masks = p.masks()
    masks["mask"] = _permute_mask(p.mask, sigma, (-1,))
    masks["key_mask"] = None if p.key_mask is None else p.key_mask[:, sigma]
    y2, P2 = call(impl, p, key=k[:, sigma], value=v[:, sigma], masks=masks, return_weights=rw)
    M = magnitude(p, y)
    close(y2, y, t2(M), "output after permuting keys and values")
    if rw:
        close(P2, P[..., sigma], weights_tol(p), "weights after permuting keys and values")


@prop("batch_independence", theme="equivariance", max_batch=4, positional=True)
def batch_independence(impl, p):
    """Batch elements do not interact: f(x)[b] = f(x[b:b+1]; M[b:b+1], km[b:b+1]) for every b. T2."""
    y, _ = call(impl, p)
    k, v = p.kv
    M = magnitude(p, y)
    for b in range(p.config.B):
        masks = p.masks()
        if p.mask is not None:
            m = p.mask.reshape((1,) * (4 - p.mask.ndim) + p.mask.shape)
            masks["mask"] = m[b:b + 1] if m.shape[0] > 1 else m
        if p.key_mask is not None:
            masks["key_mask"] = p.key_mask[b:b + 1]
        sub = replace(p, config=replace(p.config, B=1))
        yb, _ = call(impl, sub, query=p.query[b:b + 1], key=k[b:b + 1], value=v[b:b + 1], masks=masks)
        close(yb[0], y[b], t2(M), f"batch element {b} alone")
