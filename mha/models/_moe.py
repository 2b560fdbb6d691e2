r"""gpt-oss's mixture-of-experts MLP, generic over the array namespace ``xp`` (numpy or mlx.core).

For a token x (E,), with n experts, each an (E, 2F) gate-up and an (F, E) down projection with biases:

.. math::

    r = W_r x + b_r \in \mathbb{R}^n,\quad S = \text{top-}k(r),\quad p = \mathrm{softmax}(r_S) \\
    h_e = x W^{gu}_e + b^{gu}_e,\quad g = \min(h_e[0::2], \ell),\quad u = \mathrm{clip}(h_e[1::2], -\ell, \ell) \\
    y = \sum_{e \in S} p_e \left( ((u + 1) \odot g\,\sigma(\alpha g)) W^{d}_e + b^{d}_e \right)

with gate and up interleaved in the gate-up output (even columns gate, odd up), :math:`\alpha` = 1.702
and the clamp :math:`\ell` = ``swiglu_limit`` (7). The routing (top-k by the router logits, ties to the
lower index, as torch.topk) is decided on the host; each expert then runs on the tokens routed to it.

Canonical weights per layer ``{i}.``: ``mlp.router.w`` (n, E) and ``.b`` (n,); ``mlp.experts.gate_up``
(n, E, 2F) and ``.b`` (n, 2F); ``mlp.experts.down`` (n, F, E) and ``.b`` (n, E): the experts as stored
(in, out), unlike every other weight.
"""

from __future__ import annotations

import numpy as np

from .._backends import to_numpy

ALPHA = 1.702
NAMES = ("mlp.router.w", "mlp.router.b", "mlp.experts.gate_up", "mlp.experts.gate_up.b", "mlp.experts.down",
         "mlp.experts.down.b")
KEYS = ("router_t", "router_b", "gate_up", "gate_up_b", "down", "down_b")


def params(w: dict, p: str, native) -> dict:
    """Layer ``p``'s MoE weights as the block holds them (the router transposed to (E, n))."""
    b = {k: native(w[p + n]) for k, n in zip(KEYS, NAMES)}
    b["router_t"] = native(np.ascontiguousarray(w[p + NAMES[0]].T))
    return b


def canonical(b: dict, p: str) -> dict:
    """The canonical weights back from the block's arrays."""
    out = {p + n: np.ascontiguousarray(to_numpy(b[k]), dtype=np.float32) for k, n in zip(KEYS, NAMES)}
    out[p + NAMES[0]] = np.ascontiguousarray(out[p + NAMES[0]].T)
    return out


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(experts (N, k), weights (N, k) float32): the k largest router logits of each token, largest
    first (ties to the lower index), and their softmax."""
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # (N, k)
    top = np.take_along_axis(logits, order, -1).astype(np.float32)
    p = np.exp(top - top.max(-1, keepdims=True))
    return order, (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _sigmoid(xp, x):
    return 0.5 + 0.5 * xp.tanh(0.5 * x)


def moe(xp, x, b: dict, top_k: int, limit: float):
    """x (B, T, E) -> (B, T, E): the module docstring's y for every token."""
    B, T, E = x.shape
    flat = x.reshape(B * T, E)  # (N, E)
    logits = flat @ b["router_t"] + b["router_b"]  # (N, n)
    experts, weights = route(np.asarray(to_numpy(logits), np.float32), top_k)
    out = xp.zeros(flat.shape, dtype=flat.dtype)
    for e in np.unique(experts):
        tok, slot = np.nonzero(experts == e)  # tokens routed to e (each once)
        idx = tok if xp is np else xp.array(tok)
        h = xp.take(flat, idx, axis=0) @ b["gate_up"][int(e)] + b["gate_up_b"][int(e)]  # (n_e, 2F)
        gate = xp.minimum(h[:, 0::2], limit)
        up = xp.clip(h[:, 1::2], -limit, limit)
        y = ((up + 1) * (gate * _sigmoid(xp, ALPHA * gate))) @ b["down"][int(e)] + b["down_b"][int(e)]  # (n_e, E)
        p = weights[tok, slot][:, None].astype(np.float32)
        y = y * (p.astype(y.dtype) if xp is np else xp.array(p).astype(y.dtype))
        if xp is np:
            out[tok] += y
        else:
            out = out.at[idx].add(y)
    return out.reshape(B, T, E)
