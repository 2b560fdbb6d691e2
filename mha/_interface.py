"""What a backend implements: the hooks of :class:`mha.MultiHeadAttention` that its subclass fills in.

A backend is a subclass of :class:`mha.MultiHeadAttention` in a package of its own (``mha_cpu``,
``mha_mlx``; neither imports the other), registered by name in ``mha._backends``. The shared class
does everything backend-free: construction and weights, the call's checks and masks (once, into an
``mha._prepare.Prepared`` record), the route (empty, reference or fast), the reference algorithm
(``mha._reference``, over the backend's array namespace), the cache, and the results. The backend
supplies the array namespace and these hooks; nothing else of it is called.

- ``backend``: its name ("numpy", "mlx"); ``_xp``: its array namespace (numpy or mlx.core).
- ``fast_weights``: whether :meth:`_forward` returns weights and lse too (else calls asking for them
  take the reference path); :meth:`_fast_lse` may say it returns lse (without weights) for some sizes.
- :meth:`_dtypes`, :meth:`_init_rng`, :meth:`_is_native`, :meth:`_from_numpy`, :meth:`_set_params`,
  :meth:`_native_params`, :meth:`_dropout_multiplier`, :meth:`_forward`, :meth:`_attend` (the core);
  optionally :meth:`_errstate`, :meth:`_settle`, :meth:`_rope` and :meth:`small_blocks`.

Tests hold both backends to this: the same public names and signatures (tests/test_api.py), and every
hook's result checked against the reference by the property suite.
"""

from __future__ import annotations

import contextlib

import numpy as np


class BackendHooks:
    """The hooks a backend's layer class implements (see the module docstring)."""

    backend: str = ""
    _xp = None
    fast_weights: bool = False

    def _dtypes(self):
        """(compute dtype, accumulation dtype) as native dtype objects; the softmax runs in the second."""
        raise NotImplementedError

    def _init_rng(self, seed) -> None:
        """Seed the dropout stream (None: from entropy), kept apart from the initialisation's."""
        raise NotImplementedError

    def _is_native(self, x) -> bool:
        """Whether ``x`` is already this backend's array type."""
        raise NotImplementedError

    def _from_numpy(self, x: np.ndarray):
        """A numpy array (any strides, byte order or dtype the checks let through) as a native array."""
        raise NotImplementedError

    def _as_input(self, x):
        """A native query, key or value in the layout the backend computes on (default: as it is)."""
        return x

    def _set_params(self, weights) -> None:
        """Take the parameters of an :class:`mha.AttentionWeights` (checked to fit) in the compute dtype."""
        raise NotImplementedError

    def _native_params(self) -> dict:
        """The parameters as native arrays: ``q_weight``, ``k_weight``, ``v_weight``, ``o_weight`` (out, in)
        and the four biases (or None), as :func:`mha.reference.multi_head_attention` takes them."""
        raise NotImplementedError

    def _dropout_multiplier(self, shape, p: float, dtype):
        """A native (shape) array: 0 with probability p, else 1 / (1 - p)."""
        raise NotImplementedError

    def _fast_lse(self, B: int, T: int, S: int) -> bool:
        """Whether :meth:`_forward` returns lse (weights not asked) for a call of these sizes, even when
        ``fast_weights`` is False (MLX: when the call runs blockwise)."""
        return self.fast_weights

    def _forward(self, call):
        """(output (B, T, E), weights or None, lse or None) of a prepared call (mha._prepare.Prepared) on
        the "fast" route: no dropout, T and S > 0, weights/lse asked only as ``fast_weights`` and
        :meth:`_fast_lse` allow. It must give the reference's result within the derived tolerance, and
        follow its rules for empty rows and non-finite inputs exactly (the property suite checks)."""
        raise NotImplementedError

    def _attend(self, q, k, v, masks, *, scale: float, softcap=None, sinks=None, dropout=None,
                return_weights: bool = False):
        """The backend's attention core (the seam, docs/architecture.md): ``(context, lse[, weights])`` of
        q (B, H, T, D) and k, v (B, Hkv, S, D) under ``masks`` (mha._masks.MaskSet), as
        :func:`mha.reference.attend` defines them. Default: that reference on this backend's arrays."""
        from ._reference import attend

        with self._errstate():
            return attend(self._xp, q, k, v, masks, scale=scale, softcap=softcap, sinks=sinks, dropout=dropout,
                          return_weights=return_weights, acc_dtype=self._dtypes()[1])

    def _errstate(self):
        """A context for the arithmetic (numpy: no warnings for the NaN/inf the rules propagate)."""
        return contextlib.nullcontext()

    def _settle(self, cache) -> None:
        """Called on a cache when it is made and after each call that appended to it, so that any thread
        can use it next (MLX: an unevaluated array belongs to the thread that made it). Default: nothing."""

    @classmethod
    def small_blocks(cls, block_q: int = 2, block_k: int = 3):
        """A context in which the fast path splits even tiny problems into blocks of ``block_q`` queries
        and ``block_k`` keys (and whatever else it does only for large ones), so that a property suite on
        small problems reaches every branch. Backends without blocks return a null context."""
        return contextlib.nullcontext()
