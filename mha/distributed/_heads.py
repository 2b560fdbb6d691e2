r"""Head parallelism: each rank keeps some heads' weights, the partial outputs are summed.

.. math::

    y = \sum_r \Big(\mathrm{concat}_{h \in \mathcal{H}_r}\big(P_h V_{g(h)}\big)\, W_O[:, \mathcal{H}_r]^\top\Big) + b_O

Rank r holds the rows of W_q for its query heads :math:`\mathcal{H}_r`, the rows of W_k and W_v for
their key/value heads, and the matching columns of W_O (mlx-lm's sharding: Q/K/V by output rows, O by
input columns); the sum runs as ``mx.distributed.all_sum``, and every rank returns the full output.
``b_O`` is added on rank 0 only. GQA groups (a key/value head and the G query heads that read it)
stay whole on one rank, so no key/value head is stored twice.
"""

from __future__ import annotations

import warnings

import numpy as np

from .._backends import to_numpy
from .._layer import MultiHeadAttention
from .._prune import prune_weights
from .._weights import AttentionWeights
from ._comm import Comm


class UnevenSplitWarning(UserWarning):
    """The heads (GQA groups) do not divide evenly over the ranks: some ranks do more work."""


def head_split(num_heads: int, num_kv_heads: int, size: int) -> list[range]:
    """The query heads each of ``size`` ranks keeps: contiguous whole GQA groups, as even as they allow
    (numpy.array_split's rule: the first ``num_kv_heads % size`` ranks get one group more).

    Raises ValueError when there are fewer groups than ranks (a rank would have no head)."""
    if size > num_kv_heads:
        what = "heads" if num_kv_heads == num_heads else f"GQA groups (num_kv_heads={num_kv_heads})"
        raise ValueError(f"group size {size} is larger than the layer's {num_kv_heads} {what}: every rank needs "
                         f"at least one whole group; use at most {num_kv_heads} ranks (or SequenceParallel)")
    G = num_heads // num_kv_heads
    bounds = [r * (num_kv_heads // size) + min(r, num_kv_heads % size) for r in range(size + 1)]
    return [range(bounds[r] * G, bounds[r + 1] * G) for r in range(size)]


class HeadParallel:
    """A layer's heads spread over the ranks of an ``mx.distributed`` group (see the module docstring).

    Called exactly like the layer, with the same arguments on every rank (SPMD: each rank makes the
    same calls in the same order); returns the full output on every rank.

    Args:
        layer: an ``mha.MultiHeadAttention`` (numpy or MLX backend); it is not changed, and this object
            keeps only the rank's share of its weights.
        group: an ``mx.distributed.Group``; None: the global group (``mx.distributed.init()``).
        timeout: seconds any exchange may wait for the other ranks before raising
            :class:`mha.distributed.PeerTimeout` (None: wait for ever). It must exceed the longest time
            a rank computes between two exchanges (a whole layer call here).
        gather_weights: make ``return_weights=True`` (and ``return_lse``) return all H heads on every
            rank (one more all_gather) instead of the rank's own.

    Attributes:
        heads: the query heads (original 0-based numbers, a ``range``) this rank computes.
        split: every rank's ``heads``, in rank order.
        layer: the rank's layer (its heads only; the output bias only on rank 0).

    ``return_weights`` / ``return_lse`` give the rank's heads, (B, len(heads), T, S) / (B, len(heads), T);
    :meth:`gather_heads` assembles all H heads on every rank. A cache from :meth:`init_cache` holds the
    rank's key/value heads only. With ``training=True`` and dropout, each rank draws its own dropout
    stream (same distribution as the single layer, not the same draws). Heads that do not divide over
    the ranks are spread as evenly as whole GQA groups allow, with an :class:`UnevenSplitWarning`.
    """

    def __init__(self, layer, group=None, *, timeout: float | None = 600.0, gather_weights: bool = False):
        if not isinstance(layer, MultiHeadAttention):
            raise TypeError(f"layer must be an mha.MultiHeadAttention (numpy or MLX backend), got "
                            f"{type(layer).__name__}")
        self.comm = Comm(group, timeout)
        H, Hkv = layer.num_heads, layer.num_kv_heads
        self.split = head_split(H, Hkv, self.comm.size)
        self.heads = self.split[self.comm.rank]
        self.num_heads = H
        self.gather_weights = bool(gather_weights)
        if len({len(r) for r in self.split}) > 1:
            warnings.warn(f"{H} heads in {Hkv} groups do not divide over {self.comm.size} ranks: ranks hold "
                          f"{[len(r) for r in self.split]} heads", UnevenSplitWarning, stacklevel=2)
        self.layer = _rank_layer(layer, self.heads, keep_bias=self.comm.rank == 0)

    @classmethod
    def _from_rank_layer(cls, rank_layer, like: "HeadParallel"):
        new = cls.__new__(cls)
        new.__dict__.update(like.__dict__)
        new.layer = rank_layer
        return new

    def __repr__(self) -> str:
        return (f"HeadParallel(rank={self.comm.rank} of {self.comm.size}, heads={self.heads.start}..{self.heads.stop - 1}"
                f" of {self.num_heads}, backend={self.backend!r})")

    backend = property(lambda self: self.layer.backend, doc="The rank layer's backend.")
    embed_dim = property(lambda self: self.layer.embed_dim)

    def to(self, backend) -> "HeadParallel":
        """The same split on another backend (no communication)."""
        return HeadParallel._from_rank_layer(self.layer.to(backend), self)

    def init_cache(self, batch_size, max_length=None):
        """A cache for decoding that holds this rank's key/value heads only (see layer.init_cache)."""
        return self.layer.init_cache(batch_size, max_length)

    def __call__(self, query, key=None, value=None, *, mask=None, key_mask=None, causal=False, head_mask=None,
                 return_weights=False, training=False, check_finite=False, return_lse=False, cache=None):
        """As ``layer(...)``; the full (B, T, E) output on every rank (see the class docstring)."""
        batched = np.ndim(query) != 2 if not hasattr(query, "ndim") else query.ndim != 2
        mask = self._heads_of(mask, "mask", 1 if batched else 0, min_ndim=4 if batched else 3)
        head_mask = self._heads_of(head_mask, "head_mask", -1, min_ndim=1)
        res = self.layer(query, key, value, mask=mask, key_mask=key_mask, causal=causal, head_mask=head_mask,
                         return_weights=return_weights, training=training, check_finite=check_finite,
                         return_lse=return_lse, cache=cache)
        res = list(res) if isinstance(res, tuple) else [res]
        res[0] = self.comm.all_sum(res[0], "all_sum of the head-parallel output")
        if self.gather_weights:
            res[1:] = [self.gather_heads(r, batched=batched) for r in res[1:]]
        return res[0] if len(res) == 1 else tuple(res)

    def _heads_of(self, x, name: str, axis: int, min_ndim: int):
        """The rank's heads of a per-head argument whose ``axis`` has size H (other sizes left to the layer)."""
        if x is None or self.comm.size == 1:
            return x
        if not hasattr(x, "ndim"):
            x = to_numpy(x)
        if x.ndim < min_ndim or x.shape[axis] == 1:
            return x
        if x.shape[axis] != self.num_heads:
            raise ValueError(f"{name} has {x.shape[axis]} heads on axis {axis} (shape {tuple(x.shape)}); expected "
                             f"{self.num_heads} (the layer's num_heads) or 1")
        index = [slice(None)] * x.ndim
        index[axis] = slice(self.heads.start, self.heads.stop)
        return x[tuple(index)]

    def gather_heads(self, x, *, batched: bool = True):
        """All H heads, on every rank, from each rank's share: weights (B, H_r, T, S) or lse (B, H_r, T)
        (unbatched: without B). Every rank must call it (it is a collective)."""
        axis = 1 if batched else 0
        is_np = isinstance(x, np.ndarray)
        xp = np if is_np else _mx()
        moved = xp.moveaxis(x, axis, 0)  # (H_r, ...)
        most = max(len(r) for r in self.split)
        if moved.shape[0] < most:  # all_gather needs equal shapes: pad to the largest share
            pad = xp.zeros((most - moved.shape[0],) + tuple(moved.shape[1:]), dtype=moved.dtype)
            moved = xp.concatenate([moved, pad], axis=0)
        got = self.comm.all_gather(moved, "all_gather of the heads' weights")  # (size * most, ...)
        parts = [got[i * most:i * most + len(r)] for i, r in enumerate(self.split)]
        return xp.moveaxis(xp.concatenate(parts, axis=0), 0, axis)


def _mx():
    import mlx.core as mx

    return mx


def _rank_layer(layer, heads: range, keep_bias: bool):
    """The layer restricted to ``heads`` (whole GQA groups), its output bias zeroed unless ``keep_bias``."""
    w = layer.weights
    drop = [h for h in range(layer.num_heads) if h not in heads]
    part = prune_weights(w, drop) if drop else w
    if not keep_bias and part.o_bias is not None:
        d = part.to_dict()
        d["o_bias"] = np.zeros_like(d["o_bias"])
        part = AttentionWeights(**d, num_heads=part.num_heads, num_kv_heads=part.num_kv_heads)
    c = layer.config
    return type(layer).from_weights(part, scale=layer.scale, dropout=layer.dropout, dtype=layer.dtype,
                                    rope=layer.rope, window=layer.window, softcap=c.softcap, qk_norm=c.qk_norm)
