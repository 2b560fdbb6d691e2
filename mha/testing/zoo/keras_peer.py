"""Keras 3 ``keras.layers.MultiHeadAttention`` on the numpy backend (or the backend Keras already runs).

Keras reads ``KERAS_BACKEND`` once, at import: the adapter sets it to "numpy" only while it imports
Keras (when Keras is not imported yet and the variable is unset), then restores the environment, so a
user's process keeps its own choice. With Keras already imported, its backend is used and named.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from ._common import environ, f32, keep_mask


def _keras():
    if "keras" not in sys.modules:
        with environ(KERAS_BACKEND="numpy"):
            import keras  # noqa: F401
    return sys.modules["keras"]


class KerasMHA:
    """``keras.layers.MultiHeadAttention(num_heads, key_dim)``: kernels (E, H, D) and (H, D, E) set from
    the suite's weights; key_mask as its ``attention_mask`` (B, T, S), causal as ``use_causal_mask``
    (top-left, as Keras documents), weights as ``return_attention_scores``."""

    features = frozenset({"cross", "kdim", "bias", "key_mask", "causal", "weights"})
    notes = {"mask": "attention_mask is (B, T, S): no per-head masks", "additive_mask": "bool masks only",
             "gqa": "no grouped-query heads", "head_mask": "no head_mask argument",
             "scale": "the scale is fixed at 1/sqrt(key_dim)", "rope": "no rotary embeddings",
             "window": "no sliding window", "cache": "no key/value cache"}
    # its plain call fills a bool mask's False entries with a large negative (uniform rows); with
    # return_attention_scores it zeroes them: the plain call's is declared, the other path is checked against it
    conventions = {"causal": "top_left", "empty_row": "mean_value", "nonfinite": "propagates"}

    def __init__(self):
        self.name = f"keras-mha-{_keras().config.backend()}"

    def build(self, weights):
        keras = _keras()
        H, D, E = weights.num_heads, weights.head_dim, weights.embed_dim
        layer = keras.layers.MultiHeadAttention(num_heads=H, key_dim=D, value_dim=D, use_bias=weights.bias,
                                                dtype="float32")
        layer(np.zeros((1, 1, E), np.float32), np.zeros((1, 1, weights.vdim), np.float32),
              np.zeros((1, 1, weights.kdim), np.float32))  # builds the kernels
        values = []
        for p in ("q", "k", "v"):
            W = np.asarray(getattr(weights, f"{p}_weight"), np.float32)  # (H*D, in)
            values.append(W.T.reshape(-1, H, D))
            if weights.bias:
                values.append(np.asarray(getattr(weights, f"{p}_bias"), np.float32).reshape(H, D))
        values.append(np.asarray(weights.o_weight, np.float32).T.reshape(H, D, E))
        if weights.bias:
            values.append(np.asarray(weights.o_bias, np.float32))
        layer.set_weights(values)

        def fn(query, key, value, *, key_mask=None, causal=False, return_weights=False):
            B, T, _ = query.shape
            S = key.shape[1]
            kwargs = {"use_causal_mask": bool(causal), "training": False}
            if key_mask is not None:
                kwargs["attention_mask"] = keep_mask(B, 1, T, S, key_mask=key_mask)[0][:, 0]  # (B, T, S)
            with warnings.catch_warnings():  # Keras warns of a softmax over one key (S = 1), a valid case here
                warnings.filterwarnings("ignore", message="You are using a softmax over axis", category=UserWarning)
                res = layer(f32(query), f32(value), f32(key), return_attention_scores=return_weights, **kwargs)
            if return_weights:
                return np.asarray(keras.ops.convert_to_numpy(res[0])), np.asarray(keras.ops.convert_to_numpy(res[1]))
            return np.asarray(keras.ops.convert_to_numpy(res))

        return fn
