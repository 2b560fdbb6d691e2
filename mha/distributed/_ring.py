"""Sequence parallelism: ring attention (Liu et al., 2023) over the ranks of an ``mx.distributed`` group.

Rank r holds a contiguous chunk of the sequence, in rank order: its queries, keys and values (and its
columns of ``key_mask``). It projects them once (RoPE at their global positions), then passes its
key/value block to rank r + 1 and receives rank r - 1's, n - 1 times, so that every block visits every
rank; meanwhile it attends from its queries to the block it holds and merges the results by log-sum-exp
(:mod:`mha.distributed._blocks`). Blocks that the causal rule (or the window) hides entirely are passed
on without being computed. The exchange of the next block runs on the exchange thread while this one
is computed. Memory per rank: its chunk's projections and one block in flight, O(T/n * E), plus one
tile of scores (at most 2**20 floats, whatever T).

Uneven chunks: any lengths are accepted, including 0; the ranks tell each other theirs first (one small
all_gather per call), which also checks that they agree on B, the flags and the cache. ``mha.distributed
.chunk(x, group)`` cuts a sequence as numpy.array_split does (the first T mod n ranks get one more).
"""

from __future__ import annotations

import numpy as np

from .. import _masks, _prepare, _validate
from .._layer import MultiHeadAttention
from .._reference import linear, merge_heads, split_heads
from .._rope import apply_rope
from ._blocks import block_attention, block_hidden, merge
from ._comm import Comm, mx_dtype

_META = ("error", "B", "T", "S", "kv_len", "causal", "key_mask", "mask", "mask_S", "head_mask", "return_lse",
         "offset", "batched")


class RingCache:
    """The keys and values (after RoPE) a rank keeps for decoding with :class:`SequenceParallel`: its own
    chunks of every call, with their global positions. Made by :meth:`SequenceParallel.init_cache`."""

    def __init__(self, owner, xp, batch_size: int, num_kv_heads: int, head_dim: int, dtype, max_length):
        self._owner, self._xp, self.batch_size, self.max_length = owner, xp, batch_size, max_length
        self._shape, self._dtype = (batch_size, num_kv_heads, 0, head_dim), dtype
        self.reset()

    def reset(self) -> None:
        """Forget every position (on every rank: they must agree)."""
        xp = self._xp
        self.keys = xp.zeros(self._shape, dtype=self._dtype)  # (B, Hkv, kept, D)
        self.values = xp.zeros(self._shape, dtype=self._dtype)
        self.valid = xp.zeros((self.batch_size, 0), dtype=xp.bool_)  # (B, kept)
        self.positions = np.zeros(0, dtype=np.int32)  # (kept,) global positions
        self.offset = 0  # positions appended so far by all ranks together

    @property
    def kept(self) -> int:
        return int(self.positions.shape[0])

    def __repr__(self) -> str:
        return f"RingCache(batch_size={self.batch_size}, offset={self.offset}, kept_here={self.kept})"


class SequenceParallel:
    """Ring attention: each rank passes its contiguous chunk of the sequence and gets that chunk's rows of
    the layer's output (see the module docstring).

    Called like the layer, by every rank with its own chunk: ``query`` (B, T_r, E) and, for cross-attention,
    ``key``/``value`` (B, S_r, kdim/vdim); ``key_mask`` (B, S_r), the rank's columns; ``mask`` the rank's
    rows over all keys, broadcastable to (B, H, T_r, S) (a full mask costs T/n * S per rank); ``causal``,
    ``head_mask``, ``return_lse``, ``check_finite`` and the layer's RoPE and window as the layer has them.
    Global positions follow the layer's rule: query i of T at (S - T) + i, key j at j.

    Decoding: ``cache = sp.init_cache(B)``; each call appends the rank's new tokens to its own cache (a
    decoding step may give the new token to one rank and (B, 0, E) to the others). Not supported (they
    raise ValueError): ``return_weights`` (use HeadParallel), dropout in training.

    Args:
        layer: an ``mha.MultiHeadAttention`` (numpy or MLX backend); every rank holds all its weights.
        group: an ``mx.distributed.Group``; None: the global group.
        timeout: seconds any exchange may wait before :class:`mha.distributed.PeerTimeout` (None: for ever);
            it must exceed the longest time a rank computes between two exchanges (one block's attention,
            which with causal=True can be the whole of rank n - 1's work while rank 0 waits for its block).
    """

    def __init__(self, layer, group=None, *, timeout: float | None = 600.0):
        if not isinstance(layer, MultiHeadAttention):
            raise TypeError(f"layer must be an mha.MultiHeadAttention (numpy or MLX backend), got "
                            f"{type(layer).__name__}")
        self.layer = layer
        self.comm = Comm(group, timeout)

    def __repr__(self) -> str:
        return f"SequenceParallel(rank={self.comm.rank} of {self.comm.size}, {self.layer!r})"

    def init_cache(self, batch_size, max_length=None) -> RingCache:
        """An empty :class:`RingCache` for decoding (``max_length``: the most positions in total, all ranks)."""
        c = self.layer.config
        batch_size = _validate.positive_int("batch_size", batch_size)
        max_length = None if max_length is None else _validate.positive_int("max_length", max_length)
        if c.kdim != c.embed_dim or c.vdim != c.embed_dim:
            raise ValueError(f"init_cache needs a self-attention layer (kdim = vdim = embed_dim), this one has "
                             f"embed_dim={c.embed_dim}, kdim={c.kdim}, vdim={c.vdim}")
        return RingCache(self, self.layer._xp, batch_size, c.num_kv_heads, c.head_dim, self.layer._dtypes()[0],
                         max_length)

    def __call__(self, query, key=None, value=None, *, mask=None, key_mask=None, causal=False, head_mask=None,
                 return_weights=False, training=False, check_finite=False, return_lse=False, cache=None):
        """The rank's rows (B, T_r, E) of the layer's output (and lse (B, H, T_r) when asked)."""
        try:
            local, err = self._local(query, key, value, mask, key_mask, causal, head_mask, return_weights,
                                     training, check_finite, return_lse, cache), None
        except (ValueError, TypeError) as e:
            local, err = None, e
        meta = self._agree(local, err)
        q, k, v, valid, pos = self._project(local, meta, cache)
        ctx, lse = self._ring(q, k, v, valid, pos, local, meta)
        xp = self.layer._xp
        ctx = ctx.astype(self.layer._dtypes()[0])
        if local["head_mask"] is not None:
            ctx = ctx * local["head_mask"]
        p = self.layer._native_params()
        out = linear(xp, merge_heads(ctx), p["o_weight"], p["o_bias"]).astype(ctx.dtype)  # (B, T_r, E)
        res = [out, lse] if return_lse else [out]
        if not local["batched"]:
            res = [r[0] for r in res]
        return res[0] if len(res) == 1 else tuple(res)

    # -- the steps -----------------------------------------------------------------------------------
    def _local(self, query, key, value, mask, key_mask, causal, head_mask, return_weights, training,
               check_finite, return_lse, cache):
        """This rank's arguments checked and converted (no communication): a dict."""
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
        query = _prepare.convert(layer, query, "query", c.embed_dim, "E")
        if key is None and value is not None:
            raise TypeError("value was given without key; pass key too (value defaults to key)")
        if key is None and c.kdim != c.embed_dim:
            raise TypeError(f"key is required: kdim={c.kdim} differs from embed_dim={c.embed_dim}")
        key = query if key is None else _prepare.convert(layer, key, "key", c.kdim, "kdim")
        if value is None and c.vdim != c.kdim:
            raise TypeError(f"value is required: vdim={c.vdim} differs from kdim={c.kdim}")
        value = key if value is None else _prepare.convert(layer, value, "value", c.vdim, "vdim")
        B, T, S, batched = _validate.qkv_shapes(query, key, value)
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache holds batch_size={cache.batch_size} but the query has batch size {B}")
        if key_mask is not None:
            key_mask = _prepare._native_mask(layer, key_mask, "key_mask",
                                             lambda m: _validate.key_mask_shape(m, B, S, batched))
            key_mask = _masks.key_mask_bool(xp, key_mask, B, S)  # (B, S_r)
        if mask is not None:
            mask = _prepare._native_mask(layer, mask, "mask", lambda m: _check_mask_kind(m, B, c.num_heads, T,
                                                                                        batched))
        if head_mask is not None:
            head_mask = _prepare._native_mask(layer, head_mask, "head_mask",
                                              lambda m: _validate.head_mask_shape(m, B, c.num_heads, batched))
            head_mask = head_mask.astype(layer._dtypes()[0]).reshape(-1, c.num_heads, 1, 1)
        if _validate.boolean("check_finite", check_finite):
            for name, x in (("query", query), ("key", key), ("value", value)):
                if not bool(xp.all(xp.isfinite(x))):
                    raise ValueError(f"{name} holds NaN or inf (check_finite=True)")
        if not batched:
            query, key, value = query[None], key[None], value[None]
        dt = layer._dtypes()[0]
        query, key, value = (x if x.dtype == dt else x.astype(dt) for x in (query, key, value))
        return {"query": query, "key": key, "value": value, "B": B, "T": T,
                "S": S, "key_mask": key_mask, "mask": mask, "head_mask": head_mask, "batched": batched,
                "causal": _validate.boolean("causal", causal), "return_lse": _validate.boolean("return_lse",
                                                                                              return_lse),
                "kv_len": S + (cache.kept if cache is not None else 0),
                "offset": -1 if cache is None else cache.offset, "mask_checked": None,
                "max_length": None if cache is None else cache.max_length}

    def _agree(self, local, err):
        """Every rank's sizes and flags (one all_gather), checked to agree; raises the same error on every
        rank when one rank's arguments were wrong or the ranks disagree."""
        row = np.zeros(len(_META), dtype=np.int32)
        if local is None:
            row[0] = 1
        else:
            m = local["mask"]
            row[1:] = [local["B"], local["T"], local["S"], local["kv_len"], local["causal"],
                       local["key_mask"] is not None, m is not None, 0 if m is None else (m.shape[-1] if m.ndim else 1),
                       local["head_mask"] is not None, local["return_lse"], local["offset"], local["batched"]]
        table = self.comm.all_gather(row[None], "the exchange of chunk sizes")  # (n, fields)
        if err is not None:
            raise err
        bad = [i for i in range(table.shape[0]) if table[i, 0]]
        if bad:
            raise ValueError(f"rank {bad[0]} rejected its arguments (its own error says why); every rank stops")
        meta = {name: table[:, i] for i, name in enumerate(_META)}
        for name in ("B", "causal", "key_mask", "mask", "head_mask", "return_lse", "offset", "batched"):
            if len(set(meta[name].tolist())) > 1:
                raise ValueError(f"the ranks disagree on {name}: {meta[name].tolist()} in rank order; every rank "
                                 f"must make the same call with its own chunk of the sequence")
        T, S, offset = int(meta["T"].sum()), int(meta["S"].sum()), int(meta["offset"][0])
        if offset >= 0:
            S = offset + T  # with a cache: every position so far, the new ones last
            limit = local["max_length"]
            if limit is not None and S > limit:
                raise ValueError(f"cache is full: it holds {offset} of max_length={limit} positions and {T} more "
                                 f"were given (all ranks together); make it with a larger max_length (or None)")
        if meta["mask"][0] and any(s not in (1, S) for s in meta["mask_S"].tolist()):
            raise ValueError(f"mask: its last axis must be 1 or S = {S} (all keys, over all ranks), got "
                             f"{meta['mask_S'].tolist()} in rank order")
        meta["T_total"], meta["S_total"] = T, S
        return meta

    def _project(self, local, meta, cache):
        """q (B, H, T_r, D), and the rank's key/value block (B, Hkv, S_b, D) with its key validity
        (B, S_b) and global positions (S_b,): RoPE applied at those positions; with a cache, the new
        keys appended to it and the block is all it keeps."""
        layer, c, xp, r = self.layer, self.layer.config, self.layer._xp, self.comm.rank
        acc = layer._dtypes()[1]
        p = layer._native_params()
        q = split_heads(linear(xp, local["query"], p["q_weight"], p["q_bias"]), c.num_heads)  # (B, H, T_r, D)
        k = split_heads(linear(xp, local["key"], p["k_weight"], p["k_bias"]), c.num_kv_heads)  # (B, Hkv, S_r, D)
        v = split_heads(linear(xp, local["value"], p["v_weight"], p["v_bias"]), c.num_kv_heads)
        q0, k0 = int(meta["T"][:r].sum()), int(meta["S"][:r].sum())
        if cache is None:
            q0 += meta["S_total"] - meta["T_total"]  # the layer's rule: queries aligned at the end
        else:
            q0 += cache.offset
            k0 = q0
        qpos = np.arange(q0, q0 + local["T"], dtype=np.int32)
        kpos = np.arange(k0, k0 + local["S"], dtype=np.int32)
        if c.rope is not None:
            q = apply_rope(xp, q, c.rope, q0, acc)
            k = apply_rope(xp, k, c.rope, k0, acc)
        valid = local["key_mask"]
        if valid is None and (meta["key_mask"][0] or cache is not None):
            valid = xp.ones((local["B"], local["S"]), dtype=xp.bool_)
        local["qpos"] = qpos
        if cache is None:
            return q, k, v, valid, kpos
        cache.keys = xp.concatenate([cache.keys, k], axis=2)  # (B, Hkv, kept, D)
        cache.values = xp.concatenate([cache.values, v], axis=2)
        cache.valid = xp.concatenate([cache.valid, valid], axis=1)
        cache.positions = np.concatenate([cache.positions, kpos])
        cache.offset += meta["T_total"]
        return q, cache.keys, cache.values, cache.valid, cache.positions

    def _ring(self, q, k, v, valid, kpos, local, meta):
        """(context (B, H, T_r, D), lse (B, H, T_r)) over every rank's block, passed around the ring."""
        layer, c, xp = self.layer, self.layer.config, self.layer._xp
        n, r, acc = self.comm.size, self.comm.rank, layer._dtypes()[1]
        qpos, B, T = local["qpos"], local["B"], local["T"]
        block, total = (k, v, valid, kpos), None
        for step in range(n):
            src = (r - step) % n
            ticket = self._shift(block, src, (src - 1) % n, meta) if step < n - 1 else None
            bk, bv, bvalid, bpos = block
            if not block_hidden(qpos, bpos, local["causal"], c.window):
                keep, bias = self._block_masks(local, meta, bvalid, bpos, acc)
                part = block_attention(xp, q, bk, bv, qpos, bpos, causal=local["causal"], window=c.window,
                                       scale=c.effective_scale, keep=keep, bias=bias,
                                       acc_dtype=acc)  # (B, H, T_r, D), (B, H, T_r)
                total = merge(xp, total, part)
                if xp is not np:
                    xp.eval(*total)  # one block's graph at a time
            if ticket is not None:
                block = self._receive(ticket)
        if total is None:  # nothing visible anywhere (or no queries): zero context, lse -inf
            total = (xp.zeros((B, c.num_heads, T, c.head_dim), dtype=acc),
                     xp.full((B, c.num_heads, T), float("-inf"), dtype=acc))
        return total

    def _shift(self, block, src: int, incoming: int, meta):
        """Send the block (that came from rank ``src``) on and start receiving the one from rank
        ``incoming``: a ticket for :meth:`_receive`. Empty arrays are not sent (both sides know every
        block's length from ``meta``)."""
        k, v, valid, pos = block
        B, Hkv, _, D = k.shape
        n_out, n_in = int(meta["kv_len"][src]), int(meta["kv_len"][incoming])
        dt = mx_dtype(k.dtype)
        shapes = [((B, Hkv, n_in, D), dt), ((B, Hkv, n_in, D), dt), ((n_in,), mx_dtype(np.int32))]
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
            got = [xp.zeros(shapes[0], dtype=dtype), xp.zeros(shapes[1], dtype=dtype), np.zeros(0, np.int32)]
            got += [xp.zeros(shapes[3], dtype=xp.bool_)] if has_valid else []
        elif xp is np:
            got = [np.array(a) for a in got]
        k, v, pos = got[0], got[1], np.array(got[2]).astype(np.int32)
        return k, v, (got[3] if has_valid else None), pos

    def _block_masks(self, local, meta, valid, kpos, acc):
        """(keep, bias) of one block, broadcastable to (B, H, T_r, S_b): the user's mask at the block's
        columns and its key validity (the causal/window rules come from positions, per tile)."""
        xp, c = self.layer._xp, self.layer.config
        mask = local["mask"]
        if mask is not None:
            if local["mask_checked"] is None:
                _validate.mask_shape(mask, local["B"], c.num_heads, local["T"], meta["S_total"], local["batched"])
                local["mask_checked"] = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # 4-D
            mask = local["mask_checked"]
            if mask.shape[-1] != 1:
                mask = xp.take(mask, kpos if xp is np else xp.array(kpos), axis=-1)  # key j sits at position j
        ms = _masks.prepare(xp, mask=mask, key_mask=valid, causal=False, T=local["T"], S=len(kpos), bias_dtype=acc)
        return ms.keep, ms.bias


def _check_mask_kind(m, B: int, H: int, T: int, batched: bool) -> None:
    """The mask's dtype and every axis but the last (S is known once the ranks have told their sizes)."""
    _validate.mask_shape(m, B, H, T, m.shape[-1] if m.ndim else 1, batched)
