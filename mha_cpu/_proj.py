"""The numpy backend's projection weights, in the forms the fast path uses.

- Q/K/V fused into one GEMM for self-attention, and K/V for cross-attention with kdim == vdim.
- The scale folded into W_q and b_q (no pass over the logits multiplies them). Should that overflow (a
  scale like 3e38), it is folded less a power of two, which :attr:`Projections.logit_scale` gives back
  exactly when the logits are exponentiated.
- The augmented form (``aug``): one more output per head, 0 for queries (the kernel writes the softmax
  offset there) and 1 for keys and values (mha_cpu._kernel).
- Every weight stored transposed, (in, out) and contiguous, for ``x @ wt``: OpenBLAS packs the (out, in)
  layout's transpose at every call, which costs as much as the product at a few rows (measured, one
  thread, 4 x 512 by 512 x 1560: 659 us as x @ W.T, 364 us as x @ Wt; equal from ~256 rows on).
- Per group of key/value heads, the columns of the fused (augmented) projection that the split by head
  groups needs, made once per number of groups.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ._pool import Slot

QKV, Q, KV, K, V = Slot("QKV projection"), Slot("Q projection"), Slot("KV projection"), Slot("K"), Slot("V")
_FOLD_LIMIT = 2.0**64  # the folded query weights stay below this (logits far from float32's 3.4e38)


class Projections:
    """See the module docstring. ``params``: the layer's (out, in) weights and biases, numpy, its dtype."""

    def __init__(self, params: dict, config):
        c = self.config = config
        dt = params["q_weight"].dtype
        self.o_weight_t, self.o_bias = np.ascontiguousarray(params["o_weight"].T), params["o_bias"]
        zeros = {n: np.zeros(params[f"{n}_weight"].shape[0], dt) for n in "qkv"}
        w = {n: params[f"{n}_weight"] for n in "qkv"}
        b = {n: params[f"{n}_bias"] if params[f"{n}_bias"] is not None else zeros[n] for n in "qkv"}
        wmax = max(np.abs(w["q"]).max(initial=0), np.abs(b["q"]).max(initial=0))
        s, self.logit_scale = _fold(c.effective_scale, float(wmax))  # Python floats: |W| * 1e38 overflows float32
        plain = {"q": (w["q"] * dt.type(s), b["q"] * dt.type(s)), "k": (w["k"], b["k"]), "v": (w["v"], b["v"])}
        heads = {"q": c.num_heads, "k": c.num_kv_heads, "v": c.num_kv_heads}
        aug = {n: _augment(*plain[n], heads[n], 0 if n == "q" else 1) for n in "qkv"}
        self.forms = {False: plain, True: aug}
        for form in self.forms.values():
            if c.kdim == c.vdim == c.embed_dim:
                form["qkv"] = tuple(np.concatenate([form[n][i] for n in "qkv"]) for i in (0, 1))
            if c.kdim == c.vdim:
                form["kv"] = tuple(np.concatenate([form[n][i] for n in "kv"]) for i in (0, 1))
            for name, (w_, b_) in form.items():  # (in, out), contiguous
                form[name] = (np.ascontiguousarray(w_.T), b_)
        self._groups = {}

    @contextlib.contextmanager
    def heads(self, call, workers, aug: bool):
        """(q, k, v) as (B, L, heads, Dq) views of one or two GEMM outputs in this thread's scratch (held
        for the ``with`` block); q scaled. ``aug``: Dq = D + 1, the augmented form."""
        c, form = self.config, self.forms[aug]
        query, key, value = call.query, call.key, call.value
        B, T, _ = query.shape
        L = key.shape[1]
        H, Hkv, Dq = c.num_heads, c.num_kv_heads, c.head_dim + aug
        dt = query.dtype
        with contextlib.ExitStack() as stack:
            def linear(slot, x, wb):
                out = stack.enter_context(slot.lease(x.shape[:-1] + (wb[0].shape[1],), dt))
                return workers.linear(x, *wb, out)

            if call.self_attention and "qkv" in form:  # one GEMM
                y = linear(QKV, query, form["qkv"])
                q, k, v = y[..., :H * Dq], y[..., H * Dq:(H + Hkv) * Dq], y[..., (H + Hkv) * Dq:]
            else:
                q = linear(Q, query, form["q"])
                if value is key and "kv" in form:
                    kv = linear(KV, key, form["kv"])
                    k, v = kv[..., :Hkv * Dq], kv[..., Hkv * Dq:]
                else:
                    k, v = linear(K, key, form["k"]), linear(V, value, form["v"])
            yield q.reshape(B, T, H, Dq), k.reshape(B, L, Hkv, Dq), v.reshape(B, L, Hkv, Dq)

    def groups(self, g: int) -> list:
        """Per group of key/value heads (g groups): (first, end) kv head and its columns of the fused
        Q/K/V projection in the augmented form (weight (in, out), bias), contiguous. Made once per g."""
        found = self._groups.get(g)
        if found is not None:
            return found
        c = self.config
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        G, Dq = H // Hkv, D + 1
        w, b = self.forms[True]["qkv"]
        found = []
        for i in range(g):
            g0, g1 = i * Hkv // g, (i + 1) * Hkv // g
            rows = np.concatenate([np.arange(g0 * G * Dq, g1 * G * Dq), H * Dq + np.arange(g0 * Dq, g1 * Dq),
                                   (H + Hkv) * Dq + np.arange(g0 * Dq, g1 * Dq)])
            found.append((g0, g1, np.ascontiguousarray(w[:, rows]), b[rows]))
        self._groups[g] = found
        return found


def _fold(scale: float, wmax: float) -> tuple[float, float]:
    """(folded, logit_scale): fold ``scale`` into W_q whole when that stays below _FOLD_LIMIT, else a
    power of two less, which the kernel multiplies back (exactly) at the exp."""
    if scale == 0 or wmax * abs(scale) <= _FOLD_LIMIT:
        return scale, 1.0
    e = math.ceil(math.log2(wmax * abs(scale) / _FOLD_LIMIT))
    return math.ldexp(scale, -e), math.ldexp(1.0, e)


def _augment(w, b, heads: int, fill: float):
    """(w, b) of a projection with one more output per head, whose weights are 0 and bias ``fill``."""
    dt = w.dtype
    w = np.concatenate([w.reshape(heads, -1, w.shape[-1]), np.zeros((heads, 1, w.shape[-1]), dt)], axis=1)
    b = np.concatenate([b.reshape(heads, -1), np.full((heads, 1), fill, dt)], axis=1)
    return w.reshape(-1, w.shape[-1]), b.reshape(-1)
