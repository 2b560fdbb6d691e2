"""The numpy backend: runs anywhere numpy does."""

from __future__ import annotations

import numpy as np

from mha._base import LayerBase
from mha._reference import multi_head_attention


class MultiHeadAttention(LayerBase):
    """Multi-head attention on numpy (float32 or float64).

    Same constructor and call as :class:`mha.MultiHeadAttention` (without ``backend``); see there.
    """

    backend = "numpy"
    _xp = np

    def _dtypes(self):
        dt = np.dtype(self._config.dtype)
        return dt, dt  # float32 accumulates in float32 (as BLAS does), float64 in float64

    def _errstate(self):
        return np.errstate(invalid="ignore", over="ignore", divide="ignore")

    def _init_rng(self, seed) -> None:
        # A stream of its own for dropout, so that dropout draws never shift the initialisation.
        self._rng = np.random.default_rng(None if seed is None else [seed, 1])

    def _is_native(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def _from_numpy(self, x):
        return x

    def _set_params(self, weights) -> None:
        dt = np.dtype(self._config.dtype)
        self._params = {k: None if v is None else np.array(v, dtype=dt, copy=True)
                        for k, v in weights.to_dict().items()}

    def _native_params(self) -> dict:
        return self._params

    def _dropout_multiplier(self, shape, p, dtype):
        keep = self._rng.random(shape) >= p
        return keep.astype(dtype) / dtype.type(1.0 - p)

    def _fast_forward(self, query, key, value, masks, head_mask):
        c = self._config
        out, _ = multi_head_attention(np, query, key, value, self._params, num_heads=c.num_heads,
                                      num_kv_heads=c.num_kv_heads, scale=c.effective_scale, masks=masks,
                                      head_mask=head_mask)
        return out
