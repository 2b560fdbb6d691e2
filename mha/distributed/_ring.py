"""Sequence parallelism: ring attention (Liu et al., 2023) over the ranks of an ``mx.distributed`` group.

Each rank holds some rows of the sequence: its queries, keys and values (and its columns of ``key_mask``),
in contiguous chunks in rank order or, with ``order="zigzag"``, two chunks each (rank r: chunks r and
2n - 1 - r of 2n), which gives every rank the same work under causal attention. One call:

1. check: the rank's arguments through the layer's front end (mha._prepare), no communication;
2. project: q, k, v (and q/k norm) of the rank's rows;
3. agree: one all_gather of every rank's sizes, flags, largest |q| and |k| and verdict, so that a bad
   argument on one rank raises the same error on every rank before any attention work, and all ranks
   know every rank's rows and positions;
4. place: RoPE at the global positions; with a :class:`RingCache`, the new keys appended to it;
5. ring: the rank's key/value block goes to rank r + 1 and rank r - 1's comes in, n - 1 times, while
   the rank's queries attend to the block it holds: the backend's core (``layer._attend``) on each pair
   of a span of queries and a run of keys, merged by log-sum-exp (mha.distributed._merge);
6. output: head_mask and W_O on the rank's rows.

The causal and window rules come from positions alone, through the call's mha._masks.MaskSet: the ring
has no rule of its own. Pairs whose keys the rules hide from every query are not computed. Memory per
rank: its rows' projections, its block and one block in flight, O(T/n x E), plus the core's working set
for one pair (the backend's blockwise kernel: a few blocks of scores).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import numpy as np

from .. import _masks, _prepare, _validate
from .._layer import MultiHeadAttention
from .._reference import linear, merge_heads, project_heads
from ._comm import Comm, DistributedError, mx_dtype
from ._merge import Partial, attend_block, empty, merge, with_sinks, with_validity
from ._ringcache import RingCache
from ._split import check_order, positions, rank_spans, runs

MSG = 400  # characters of a rank's error message carried to the others
_FIELDS = ("error", "B", "T", "S", "kept", "causal", "key_mask", "mask", "mask_S", "head_mask", "return_lse",
           "offset", "batched", "q_top", "k_top", "msg_len")
_ERRORS = {1: ValueError, 2: TypeError, 3: DistributedError}  # by the failing rank's error
LIMIT = {4: 100, 8: 1000}  # by the accumulation dtype's size: logits kept below 2^LIMIT


@dataclass
class _Local:
    """One rank's call after the front end: its rows projected, not yet placed."""

    call: _prepare.Prepared
    mask: object  # native, checked but for its last axis, or None
    valid: object  # (B, S_r) bool or None
    q: object  # (B, H, T_r, D), before RoPE
    k: object  # (B, Hkv, S_r, D)
    v: object
    q_top: float  # largest finite |q|, |k| entries
    k_top: float
    causal: bool  # as given (the rank's own MaskSet may have dropped a rule its local positions do not need)


@dataclass
class _Plan:
    """What every rank agreed on for one call."""

    table: dict  # field -> (n,) values in rank order
    q_spans: list  # the rank's queries: [(i0, i1, first position)]
    k_spans: list  # the rank's new keys: [(j0, j1, first position)]
    S: int  # every position a query may attend (the mask's last axis): S_total, or offset + T_total
    exponent: int  # the rank's queries are divided by 2^exponent (logits inside the accumulation dtype)
    with_valid: bool  # blocks carry their key validity
    key_norm: float  # a bound on every key's norm (all ranks, RoPE included)


class SequenceParallel:
    """Ring attention: each rank passes its rows of the sequence and gets those rows of the layer's output
    (see the module docstring).

    Called like the layer, by every rank with its own rows: ``query`` (B, T_r, E) and, for cross-attention,
    ``key``/``value`` (B, S_r, kdim/vdim), cut by the same ``order``; ``key_mask`` (B, S_r), the rank's
    columns; ``mask`` the rank's rows over all keys in sequence order, broadcastable to (B, H, T_r, S) (a
    full mask costs T/n x S per rank); ``causal``, ``head_mask``, ``return_lse``, ``check_finite`` and the
    layer's RoPE and window as the layer has them. Global positions follow the layer's rule: query i of T
    at (S - T) + i, key j at j. ``mha.distributed.chunk(x, group, order=...)`` cuts an array so.

    Decoding: ``cache = sp.init_cache(B)``; each call appends the rank's new rows to its own cache (with
    ``order="contiguous"`` the ranks may pass any number of rows, 0 included: a decoding step may give
    the new token to one rank and (B, 0, E) to the others); a ``mask`` is then over every position so far
    (S = offset + T). Not supported (they raise ValueError): ``return_weights`` (use HeadParallel), dropout
    in training.

    Args:
        layer: an ``mha.MultiHeadAttention`` (numpy or MLX backend); every rank holds all its weights.
        group: an ``mx.distributed.Group``; None: the global group.
        order: "contiguous" (rank r holds chunk r, any lengths) or "zigzag" (rank r holds chunks r and
            2n - 1 - r of 2n, as :func:`mha.distributed.rank_spans` cuts them: balanced causal attention).
        timeout: seconds any exchange may wait before :class:`mha.distributed.PeerTimeout` (None: for ever);
            it must exceed the longest time a rank computes between two exchanges (one block's attention).
    """

    def __init__(self, layer, group=None, *, order: str = "contiguous", timeout: float | None = 600.0):
        if not isinstance(layer, MultiHeadAttention):
            raise TypeError(f"layer must be an mha.MultiHeadAttention (numpy or MLX backend), got "
                            f"{type(layer).__name__}")
        self.layer = layer
        self.order = check_order(order)
        self.comm = Comm(group, timeout)

    def __repr__(self) -> str:
        return f"SequenceParallel(rank={self.comm.rank} of {self.comm.size}, order={self.order!r}, {self.layer!r})"

    def init_cache(self, batch_size, max_length=None) -> RingCache:
        """An empty :class:`RingCache` for decoding (``max_length``: the most positions in total, all ranks)."""
        c = self.layer.config
        batch_size = _validate.positive_int("batch_size", batch_size)
        max_length = None if max_length is None else _validate.positive_int("max_length", max_length)
        if c.kdim != c.embed_dim or c.vdim != c.embed_dim:
            raise ValueError(f"init_cache needs a self-attention layer (kdim = vdim = embed_dim), this one has "
                             f"embed_dim={c.embed_dim}, kdim={c.kdim}, vdim={c.vdim}")
        return RingCache(self, self.layer._xp, batch_size, c.num_kv_heads, c.head_dim, self.layer._dtypes()[0],
                         max_length, c.window)

    def __call__(self, query, key=None, value=None, *, mask=None, key_mask=None, causal=False, head_mask=None,
                 return_weights=False, training=False, check_finite=False, return_lse=False, cache=None):
        """The rank's rows (B, T_r, E) of the layer's output (and lse (B, H, T_r) when asked)."""
        with _one_blas_thread(self.layer._xp):
            try:
                local, err = self._check(query, key, value, mask, key_mask, causal, head_mask, return_weights,
                                         training, check_finite, return_lse, cache), None
            except Exception as e:  # told to the other ranks first, so that none of them waits for this one
                local, err = None, e
            plan = self._agree(local, err, cache)
            with self.layer._errstate():  # numpy: no warnings for the NaN/inf the rules propagate, as the layer
                q, block = self._place(local, plan, cache)
                states = self._ring(q, block, local, plan)
                return self._output(states, local, plan)

    # -- 1, 2: this rank alone ---------------------------------------------------------------------------
    def _check(self, query, key, value, mask, key_mask, causal, head_mask, return_weights, training,
               check_finite, return_lse, cache) -> _Local:
        """The rank's arguments through the front end, and its rows projected (no communication)."""
        layer, c, xp = self.layer, self.layer.config, self.layer._xp
        if _validate.boolean("return_weights", return_weights):
            raise ValueError("return_weights=True is not supported by SequenceParallel (a rank's weights span "
                             "all S keys); use HeadParallel, or the lse it returns (return_lse=True)")
        if _validate.boolean("training", training) and c.dropout > 0:
            raise ValueError(f"training=True with dropout={c.dropout} is not supported by SequenceParallel")
        if cache is not None:
            if not isinstance(cache, RingCache) or cache._owner is not self:
                raise TypeError(f"cache must be a RingCache from this SequenceParallel's init_cache(), got "
                                f"{type(cache).__name__}")
            if key is not None or value is not None:
                raise TypeError("cache= is for self-attention: pass only the new tokens as query")
        call = _prepare.prepare(layer, query, key, value, mask=None, key_mask=key_mask, causal=causal,
                                head_mask=head_mask, return_weights=False, training=False,
                                check_finite=check_finite, return_lse=return_lse, cache=None)
        B, T, S = call.shape
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache holds batch_size={cache.batch_size} but the query has batch size {B}")
        if mask is not None:  # every axis but the last: S is known once the ranks have told their sizes
            mask = _prepare._native_mask(layer, mask, "mask", lambda m: _validate.mask_shape(
                m, B, c.num_heads, T, m.shape[-1] if m.ndim else 1, call.batched))
            _masks.check_values(xp, "mask", mask)
        valid = None if call.masks.keep is None else call.masks.keep.reshape(B, S)  # the key_mask, (B, S_r)
        q, k, v = project_heads(xp, call.query, call.key, call.value, layer._native_params(), num_heads=c.num_heads,
                                num_kv_heads=c.num_kv_heads, qk_norm=c.qk_norm,
                                acc_dtype=layer._dtypes()[1])
        return _Local(call, mask, valid, q, k, v, _top(xp, q), _top(xp, k), _validate.boolean("causal", causal))

    # -- 3: every rank ----------------------------------------------------------------------------------
    def _agree(self, local: _Local | None, err, cache) -> _Plan:
        """One all_gather of every rank's row (sizes, flags, bounds, verdict); the same error on every rank
        when one rank's arguments were wrong or the ranks disagree."""
        row = np.zeros(len(_FIELDS) + MSG, dtype=np.float64)
        if local is None:
            text = str(err) if isinstance(err, (ValueError, TypeError)) else f"{type(err).__name__}: {err}"
            msg = np.frombuffer(text[:MSG].encode("ascii", "replace"), dtype=np.uint8)
            row[0] = 2 if isinstance(err, TypeError) else 1 if isinstance(err, ValueError) else 3
            row[_FIELDS.index("msg_len")] = msg.size
            row[len(_FIELDS):len(_FIELDS) + msg.size] = msg
        else:
            call, m = local.call, local.mask
            B, T, S = call.shape
            row[1:len(_FIELDS) - 1] = [
                B, T, S, (cache._kept_next() if cache is not None else 0) + S, local.causal, local.valid is not None,
                m is not None, 0 if m is None else (m.shape[-1] if m.ndim else 1), call.head_mask is not None,
                call.return_lse, -1 if cache is None else cache.offset, call.batched, local.q_top,
                max(local.k_top, cache.top if cache is not None else 0.0)]
        got = self.comm.all_gather(row[None], "the exchange of chunk sizes")  # (n, fields + MSG)
        table = {name: got[:, i] for i, name in enumerate(_FIELDS)}
        bad = [i for i in range(got.shape[0]) if table["error"][i]]
        if err is not None and not isinstance(err, (ValueError, TypeError)):
            raise err  # this rank's own failure (the others raise DistributedError naming it)
        if bad:
            i = bad[0]
            text = bytes(got[i, len(_FIELDS):len(_FIELDS) + int(table["msg_len"][i])].astype(np.uint8)).decode()
            raise _ERRORS[int(table["error"][i])](
                f"SequenceParallel: rank {i} of {got.shape[0]} rejected its arguments, so every rank stops: {text}"
            ) from err
        return self._plan(table, local, cache)

    def _plan(self, table, local: _Local, cache) -> _Plan:
        """The agreed sizes checked and turned into this rank's spans and positions."""
        n, r = self.comm.size, self.comm.rank
        for name in ("B", "causal", "key_mask", "mask", "head_mask", "return_lse", "offset", "batched"):
            if len(set(table[name].tolist())) > 1:
                raise ValueError(f"the ranks disagree on {name}: {_ints(table[name])} in rank order; every rank "
                                 f"must make the same call with its own rows of the sequence")
        T, S_new, offset = int(table["T"].sum()), int(table["S"].sum()), int(table["offset"][0])
        q_spans, k_spans = self._spans(table["T"], T, "query"), self._spans(table["S"], S_new, "key")
        if offset >= 0:  # with a cache: every position so far, the new ones last
            S = offset + T
            if cache.max_length is not None and S > cache.max_length:
                raise ValueError(f"cache is full: it holds {offset} of max_length={cache.max_length} positions and "
                                 f"{T} more were given (all ranks together); make it with a larger max_length")
            q0 = k0 = offset
        else:
            S, q0, k0 = S_new, S_new - T, 0  # the layer's rule: queries aligned at the end
        if table["mask"][0] and any(s not in (1, S) for s in table["mask_S"].tolist()):
            raise ValueError(f"mask: its last axis must be 1 or S = {S} (all keys, over all ranks), got "
                             f"{_ints(table['mask_S'])} in rank order")
        c = self.layer.config
        limit = LIMIT[np.dtype(str(self.layer._dtypes()[1]).split(".")[-1]).itemsize]
        rope = 2.0 if c.rope is not None else 1.0  # a rotated pair's entries are at most twice the pair's
        bound = rope * table["q_top"][r] * rope * table["k_top"].max() * abs(c.effective_scale) * c.head_dim
        e = max(0, math.ceil(math.log2(bound)) - limit) if bound > 0 and c.softcap is None else 0
        return _Plan(table, [(a, b, q0 + p) for a, b, p in q_spans[r]], [(a, b, k0 + p) for a, b, p in k_spans[r]],
                     S, e, bool(table["key_mask"][0]) or offset >= 0, rope * table["k_top"].max() * c.head_dim**0.5)

    def _spans(self, sizes, total: int, what: str) -> list:
        """Every rank's rows as [(i0, i1, position - start)] from the agreed sizes and the order."""
        if self.order == "contiguous":
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
            return [[(0, int(sizes[i]), int(starts[i]))] if sizes[i] else [] for i in range(len(sizes))]
        spans = rank_spans(total, self.comm.size, "zigzag")
        want = [sum(b - a for a, b in s) for s in spans]
        if _ints(sizes) != want:
            raise ValueError(f"order='zigzag': the ranks must hold {want} {what} rows (chunks r and 2n - 1 - r of "
                             f"{total} cut in {2 * self.comm.size}; mha.distributed.chunk(x, group, order='zigzag') "
                             f"cuts them), got {_ints(sizes)} in rank order")
        out = []
        for s in spans:
            i, rows = 0, []
            for a, b in s:
                if b > a:
                    rows.append((i, i + b - a, a))
                i += b - a
            out.append(rows)
        return out

    # -- 4, 5, 6 -----------------------------------------------------------------------------------------
    def _place(self, local: _Local, plan: _Plan, cache):
        """RoPE at the global positions; the rank's block (k, v, valid, positions), after the cache."""
        layer, c, xp = self.layer, self.layer.config, self.layer._xp
        q, k, v = local.q, local.k, local.v
        if c.rope is not None:
            q = _by_span(xp, q, plan.q_spans, layer._rope)
            k = _by_span(xp, k, plan.k_spans, layer._rope)
        kpos = positions(plan.k_spans)
        valid = local.valid
        if valid is None and plan.with_valid:
            valid = xp.ones((k.shape[0], k.shape[2]), dtype=xp.bool_)
        if cache is None:
            return q, (k, v, valid, kpos)
        T = int(plan.table["T"].sum())
        cache._append(k, v, valid, kpos, local.k_top * (2.0 if c.rope is not None else 1.0),
                      cache.offset + T)
        return q, (cache.keys, cache.values, cache.valid, cache.positions)

    def _ring(self, q, block, local: _Local, plan: _Plan) -> list:
        """One :class:`Partial` per span of the rank's queries, over every rank's block."""
        layer, c, xp = self.layer, self.layer.config, self.layer._xp
        n, r, acc = self.comm.size, self.comm.rank, layer._dtypes()[1]
        if plan.exponent:  # logits in units of 2^e, so that every block's lse stays inside the dtype
            q = _times_pow2(q, -plan.exponent)
        masks = self._masks(local, plan)
        bound = None  # (B, H, T_r, 1): each query's logits are at most |scale| |q_i| max |k_j|
        if masks.bias is not None:
            bound = abs(c.effective_scale) * plan.key_norm * xp.sqrt(xp.sum(q.astype(acc) ** 2, axis=-1, keepdims=True))
        states = [None] * len(plan.q_spans)
        for step in range(n):
            src = (r - step) % n
            ticket = self._shift(block, src, (src - 1) % n, plan) if step < n - 1 else None
            bk, bv, bvalid, bpos = block
            for s, (i0, i1, p0) in enumerate(plan.q_spans):
                for j0, j1, k0 in runs(bpos):
                    pair = replace(masks.cut(rows=(i0, i1), cols=(k0, k0 + j1 - j0)), q_pos=range(p0, p0 + i1 - i0))
                    lo, hi = pair.key_span()
                    if lo == hi:  # the rules hide every key of the run from these queries
                        continue
                    pair = with_validity(xp, pair, None if bvalid is None else bvalid[:, j0:j1])
                    part = attend_block(layer, xp, q[:, :, i0:i1], bk[:, :, j0:j1], bv[:, :, j0:j1], pair,
                                        c.effective_scale, None if bound is None else bound[:, :, i0:i1], c.softcap)
                    states[s] = merge(xp, states[s], part)
            if xp is not np:
                xp.eval([a for st in states if st is not None for a in (st.ctx, st.lse, st.shift) if a is not None])
            if ticket is not None:
                block = self._receive(ticket)
        B, H, D = q.shape[0], c.num_heads, c.head_dim
        shifted = local.mask is not None and _masks.array_kind(local.mask) == "f"
        states = [st if st is not None else empty(xp, B, H, i1 - i0, D, acc, shifted)
                  for st, (i0, i1, _) in zip(states, plan.q_spans)]
        sinks = layer._native_params().get("sinks")
        if sinks is not None:  # in the logits' units: divided by 2^e as they are
            sinks = _times_pow2(sinks.astype(acc), -plan.exponent) if plan.exponent else sinks
            states = [with_sinks(xp, st, sinks) for st in states]
        return states

    def _masks(self, local: _Local, plan: _Plan):
        """The MaskSet of the rank's rows over every position (columns = positions 0 .. S - 1)."""
        xp, c = self.layer._xp, self.layer.config
        qpos = positions(plan.q_spans)
        return _masks.prepare(xp, mask=local.mask, key_mask=None, causal=local.causal,
                              bias_dtype=self.layer._dtypes()[1], window=c.window, q_pos=qpos, k_pos=range(plan.S))

    def _output(self, states: list, local: _Local, plan: _Plan):
        layer, xp = self.layer, self.layer._xp
        dt = layer._dtypes()[0]
        B, H, D = local.q.shape[0], layer.config.num_heads, layer.config.head_dim
        acc = layer._dtypes()[1]
        if not states:
            states = [empty(xp, B, H, 0, D, acc, False)]
        ctx = xp.concatenate([st.ctx for st in states], axis=2) if len(states) > 1 else states[0].ctx
        ctx = ctx.astype(dt)  # (B, H, T_r, D)
        if local.call.head_mask is not None:
            ctx = ctx * local.call.head_mask
        p = layer._native_params()
        out = linear(xp, merge_heads(ctx), p["o_weight"], p["o_bias"]).astype(dt)  # (B, T_r, E)
        res = [out]
        if local.call.return_lse:
            lse = [st.total_lse(xp) for st in states]
            lse = xp.concatenate(lse, axis=2) if len(lse) > 1 else lse[0]
            if plan.exponent:
                lse = xp.where(lse == 0, 0, _times_pow2(lse, plan.exponent))
            res.append(lse.astype(acc))
        if not local.call.batched:
            res = [a[0] for a in res]
        return res[0] if len(res) == 1 else tuple(res)

    # -- the exchanges ----------------------------------------------------------------------------------
    def _shift(self, block, src: int, incoming: int, plan: _Plan):
        """Send the block (that came from rank ``src``) on and start receiving the one from rank
        ``incoming``: a ticket for :meth:`_receive`. Empty arrays are not sent (both sides know every
        block's length from the plan)."""
        k, v, valid, pos = block
        B, Hkv, _, D = k.shape
        n_out, n_in = int(plan.table["kept"][src]), int(plan.table["kept"][incoming])
        dt = mx_dtype(k.dtype)
        shapes = [((B, Hkv, n_in, D), dt), ((B, Hkv, n_in, D), dt), ((n_in,), mx_dtype(np.int64))]
        arrays = [k, v, pos]
        if valid is not None:
            arrays.append(valid)
            shapes.append(((B, n_in), mx_dtype(np.bool_)))
        nxt = (self.comm.rank + 1) % self.comm.size
        job = self.comm.ring_shift(arrays if n_out else [], shapes if n_in else [],
                                   f"ring step (passing rank {src}'s block to rank {nxt})")
        return job, [tuple(s) for s, _ in shapes], k.dtype, valid is not None

    def _receive(self, ticket):
        """The block a :meth:`_shift` received, as (k, v, valid or None, positions (numpy))."""
        job, shapes, dtype, has_valid = ticket
        got = self.comm.wait(job)
        xp = self.layer._xp
        if not got:  # an empty block
            got = [xp.zeros(shapes[0], dtype=dtype), xp.zeros(shapes[1], dtype=dtype), np.zeros(0, np.int64)]
            got += [xp.zeros(shapes[3], dtype=xp.bool_)] if has_valid else []
        elif xp is np:
            got = [np.array(a) for a in got]
        k, v, pos = got[0], got[1], np.array(got[2]).astype(np.int64)
        return k, v, (got[3] if has_valid else None), pos


def _one_blas_thread(xp):
    """For numpy arrays, BLAS held at one thread (mha_cpu's limit) during the ring's own
    GEMMs (projections, W_O), as the numpy layer holds it for work on the calling thread: ranks often
    share a machine, and BLAS threads of several processes spinning on the same cores slow every rank
    many times over. The core's calls on this thread keep it (its pool holds BLAS at one thread a worker)."""
    if xp is not np:
        return contextlib.nullcontext()
    from mha_cpu._workers import blas_threads  # the numpy backend's limit (no rescan of the libraries per call)

    return blas_threads(1)


def _ints(values) -> list:
    return [int(x) for x in np.asarray(values).tolist()]


def _top(xp, x) -> float:
    """The largest finite |x| entry, on the host (0 for none)."""
    if x.size == 0:
        return 0.0
    top = float(xp.max(xp.abs(x)))
    return top if math.isfinite(top) else float(xp.max(xp.abs(xp.where(xp.isfinite(x), x, 0))))


def _times_pow2(x, e: int):
    """x * 2^e, exact (two factors, each a float of x's dtype)."""
    h = e // 2
    return x * math.ldexp(1.0, h) * math.ldexp(1.0, e - h)


def _by_span(xp, x, spans, rope):
    """``rope(x_span, first position)`` on each span of the sequence axis (2), concatenated."""
    if not spans:
        return x
    parts = [rope(x[:, :, a:b], p) for a, b, p in spans]
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=2)
