"""The numpy backend: runs anywhere numpy does."""

from __future__ import annotations

import numpy as np

import mha
from mha._reference import rms_norm

from . import _kernel, _options
from ._proj import Projections
from ._options import thresholds
from ._workers import TASKS_PER_WORKER, Workers


class MultiHeadAttention(mha.MultiHeadAttention):
    """Multi-head attention on numpy (float32 or float64).

    Same constructor and call as :class:`mha.MultiHeadAttention` (its ``backend`` can only be "numpy"
    or "auto" here). The fast path (:meth:`_forward`): the projections (Q/K/V fused for self-attention,
    the scale folded into W_q), q/k norm, RoPE, the cache, the core (:func:`mha_cpu.attend`), head_mask
    and W_O, by rows or by head groups. Dropout takes the reference path.
    """

    backend = "numpy"
    _xp = np
    fast_weights = True

    # -- the backend's hooks (mha._interface) --------------------------------------------------------
    def _errstate(self):
        return np.errstate(invalid="ignore", over="ignore", divide="ignore")

    def _dtypes(self):
        return self._dtype, self._dtype  # float32 accumulates in float32 (as BLAS does), float64 in float64

    def _init_rng(self, seed) -> None:
        self._dtype = np.dtype(self.config.dtype)
        # A stream of its own for dropout, so that dropout draws never shift the initialisation.
        self._rng = np.random.default_rng(None if seed is None else [seed, 1])

    def _is_native(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def _from_numpy(self, x):
        return x

    def _as_input(self, x):
        """C order, native byte order: BLAS may round a transposed (Fortran-ordered) operand differently (a
        (B, 1, E) token in Fortran order reshapes to one), and the same numbers must give the same bits."""
        if x.flags.c_contiguous and x.dtype.isnative:
            return x
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))

    def _set_params(self, weights) -> None:
        dt = self._dtype = np.dtype(self.config.dtype)
        self._params = {k: None if v is None else np.array(v, dtype=dt, copy=True)
                        for k, v in weights.to_dict().items()}
        self._proj = Projections(self._params, self.config)

    def _native_params(self) -> dict:
        return self._params

    def _dropout_multiplier(self, shape, p, dtype):
        keep = self._rng.random(shape) >= p
        return keep.astype(dtype) / dtype.type(1.0 - p)

    @classmethod
    def small_blocks(cls, block_q: int = 2, block_k: int = 3):
        """Tiny blocks and a pool for any problem (mha_cpu.small_blocks)."""
        return _options.small_blocks(block_q, block_k)

    def _attend(self, q, k, v, masks, **kwargs):
        return _kernel.attend(q, k, v, masks, **kwargs)

    def _forward(self, call):
        """Projections, q/k norm, RoPE, the cache, the core (mha_cpu._kernel), head_mask and W_O."""
        c = self._config
        B, T, S = call.shape
        H, Hkv, D, E = c.num_heads, c.num_kv_heads, c.head_dim, c.embed_dim
        flops = 2.0 * B * (T * E * 2 * H * D + call.key.shape[1] * (c.kdim + c.vdim) * Hkv * D + 2 * T * S * H * D)
        out = np.empty((B, T, E), call.query.dtype)
        with Workers(flops) as workers:
            g = self._head_groups(call, workers.n, flops)
            ctx, weights, lse = self._by_head_groups(call, workers, g) if g else self._by_rows(call, workers)
            if call.head_mask is not None:
                ctx *= call.head_mask.transpose(0, 2, 1, 3)  # (B or 1, 1, H, 1)
            workers.linear(ctx.reshape(B, T, H * D), self._proj.o_weight_t, self._params["o_bias"], out)
        return out, weights, lse

    def _heads(self, q, k, v, pos):
        """(B, L, heads, D) projections as (B, heads, L, D) views, q and k normalised and rotated."""
        c = self._config
        if c.qk_norm is not None:
            q, k = (rms_norm(np, a, self._params[n], c.qk_norm) for a, n in ((q, "q_norm"), (k, "k_norm")))
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if c.rope is not None and q.shape[2] == k.shape[2] == 1 and pos.q_offset == pos.k_offset:  # one token:
            qk, H = self._rope(np.concatenate((q, k), axis=1), pos.q_offset), q.shape[1]  # q and k in one rotation
            q, k = qk[:, :H], qk[:, H:]
        elif c.rope is not None:
            q, k = self._rope(q, pos.q_offset), self._rope(k, pos.k_offset)
        return q, k, v

    def _by_rows(self, call, workers):
        """Context (B, T, H, D), weights, lse: all rows projected, then the core shares out its tasks."""
        pos, c = call.pos, self._config
        q, k, v = self._heads(*self._proj.heads(call, workers), pos)  # (B, heads, L, D)
        finite = None
        if pos.step is not None:  # only the new keys and values are checked: the cache remembers
            k, v = pos.step.append(k, v, _kernel.all_finite(k) and _kernel.all_finite(v))
            finite = pos.step.cache.holds_nonfinite is False
        ctx, lse, *weights = _kernel.attend(q, k, v, call.masks, scale=self._proj.logit_scale, softcap=c.softcap,
                                            sinks=self._params.get("sinks"), return_weights=call.return_weights,
                                            finite=finite)
        return ctx.transpose(0, 2, 1, 3), (weights[0] if weights else None), lse  # the core's (B, T, H, D)

    def _head_groups(self, call, n: int, flops: float) -> int:
        """Groups of key/value heads per batch element for the split by head groups, 0 for the split by rows:
        self-attention without a cache on several workers, with two (batch element, key/value head) tasks
        per worker at least; the fewest groups giving every worker ~4 tasks of ``thresholds.task_flops``."""
        B, Hkv = call.query.shape[0], self._config.num_kv_heads
        if n == 1 or not call.self_attention or call.pos.step is not None or B * Hkv < 2 * n:
            return 0
        want = max(n, min(TASKS_PER_WORKER * n, int(flops // max(thresholds.task_flops, 1.0))))
        return next((g for g in range(1, Hkv + 1) if Hkv % g == 0 and B * g >= want), Hkv)

    def _by_head_groups(self, call, workers, g: int):
        """Context (B, T, H, D), weights, lse by tasks of a batch element and a group of key/value heads, each
        on one worker start to finish (its columns of the fused projection, norms, RoPE, the core on its
        heads), so that its keys and values never leave that worker's cache."""
        c, x = self.config, call.query
        B, T, _ = x.shape
        H, D, G = c.num_heads, c.head_dim, c.num_heads // c.num_kv_heads
        ctx, lse = np.empty((B, T, H, D), x.dtype), np.empty((B, H, T), x.dtype)
        weights = np.empty((B, H, T, T), x.dtype) if call.return_weights else None
        parts, sinks = self._proj.groups(g), self._params.get("sinks")

        def task(i):
            b, (g0, g1, w, bias) = i // g, parts[i % g]
            h0, h1 = g0 * G, g1 * G
            y = x[b] @ w
            if c.bias:  # (no bias: no zeros added, as in the split by rows)
                y += bias
            cuts = (0, (h1 - h0) * D, (h1 - h0 + g1 - g0) * D, None)
            q, k, v = self._heads(*(y[None, :, a:z].reshape(1, T, -1, D) for a, z in zip(cuts, cuts[1:])), call.pos)
            _kernel.attend(q, k, v, call.masks.cut(batch=(b, b + 1), heads=(h0, h1)), scale=self._proj.logit_scale,
                           softcap=c.softcap, sinks=None if sinks is None else sinks[h0:h1],
                           out=(ctx[b:b + 1, :, h0:h1], lse[b:b + 1, h0:h1],
                                None if weights is None else weights[b:b + 1, h0:h1]))

        workers.map(task, range(B * g))
        return ctx, weights, lse
