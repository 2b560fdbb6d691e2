"""Flax ``nnx.MultiHeadAttention`` on JAX's CPU backend.

JAX reads ``JAX_PLATFORMS`` at import: the adapter sets it to "cpu" only while it imports JAX (when
JAX is not imported yet and the variable is unset), then restores the environment.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from ._common import environ, f32, keep_mask


def _nnx():
    if "jax" not in sys.modules:
        with environ(JAX_PLATFORMS="cpu"):
            import jax  # noqa: F401
    from flax import nnx

    return nnx


def _set(variable, value):
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:  # older flax
        variable.value = value


class FlaxMHA:
    """``nnx.MultiHeadAttention(num_heads, in_features, num_kv_heads=...)``: kernels (E, H, D) and
    (H, D, E) set from the suite's weights; masks as its bool ``mask`` (B, H, T, S) (key_mask ANDed
    in), causal as ``is_causal`` (top-left, a tril of ones); weights by ``sow_weights=True``, which
    takes its explicit-softmax path (the plain call takes ``jax.nn.dot_product_attention``)."""

    name = "flax-nnx-mha"
    features = frozenset({"cross", "bias", "mask", "key_mask", "causal", "gqa", "weights"})
    notes = {"kdim": "one in_kv_features for keys and values", "additive_mask": "bool masks only",
             "head_mask": "no head_mask argument", "scale": "the scale is fixed at 1/sqrt(head_dim)",
             "rope": "no rotary embeddings", "window": "no sliding window", "cache": "decode caches are separate"}
    conventions = {"causal": "top_left", "empty_row": "mean_value", "nonfinite": "propagates"}

    def build(self, weights):
        nnx = _nnx()
        import jax.numpy as jnp

        H, Hkv, D, E = weights.num_heads, weights.num_kv_heads, weights.head_dim, weights.embed_dim
        m = nnx.MultiHeadAttention(num_heads=H, in_features=E, qkv_features=H * D, out_features=E,
                                   num_kv_heads=Hkv, in_kv_features=weights.kdim, use_bias=weights.bias,
                                   decode=False, deterministic=True, rngs=nnx.Rngs(0))
        for proj, p, n in (("query", "q", H), ("key", "k", Hkv), ("value", "v", Hkv)):
            layer = getattr(m, proj)
            _set(layer.kernel, jnp.asarray(f32(getattr(weights, f"{p}_weight")).T.reshape(-1, n, D)))
            if weights.bias:
                _set(layer.bias, jnp.asarray(f32(getattr(weights, f"{p}_bias")).reshape(n, D)))
        _set(m.out.kernel, jnp.asarray(f32(weights.o_weight).T.reshape(H, D, E)))
        if weights.bias:
            _set(m.out.bias, jnp.asarray(f32(weights.o_bias)))

        def fn(query, key, value, *, mask=None, key_mask=None, causal=False, return_weights=False):
            B, T, _ = query.shape
            S = key.shape[1]
            kwargs = {"is_causal": bool(causal), "deterministic": True, "sow_weights": bool(return_weights)}
            if mask is not None or key_mask is not None:
                kwargs["mask"] = jnp.asarray(keep_mask(B, H, T, S, mask, key_mask)[0])
            with warnings.catch_warnings():  # flax 0.12 deprecates Module.sow's form it uses itself
                warnings.simplefilter("ignore", DeprecationWarning)
                y = np.asarray(m(jnp.asarray(f32(query)), jnp.asarray(f32(key)), jnp.asarray(f32(value)), **kwargs))
            if not return_weights:
                return y
            P = nnx.pop(m, nnx.Intermediate)["attention_weights"]
            P = P.get_value() if hasattr(P, "get_value") else getattr(P, "value", P)
            return y, np.asarray(P[0] if isinstance(P, (tuple, list)) else P)

        return fn
