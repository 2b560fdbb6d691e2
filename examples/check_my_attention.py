"""Put your own attention function through mha's property suite.

Run: python examples/check_my_attention.py     (needs: pip install 'mha-twin[testing]')
 or: mha check --impl examples/check_my_attention.py:adapter

`my_attention` below is a plain numpy multi-head attention someone might write. The suite calls it
through a small adapter that declares what it supports; properties needing other features are "n/a".
It has two classic bugs, and the suite finds both:

1. masked logits are filled with -1e9 instead of -inf, so a query whose keys are all masked gets the
   mean of the values (empty_rows_output_bias, masked_keys_irrelevant, ... fail);
2. with that fixed (MHA_EXAMPLE_FIXED=1), a NaN sitting in a masked value still leaks into the output,
   because the weights are zero there but 0 * NaN = NaN (nonfinite_hidden_isolation,
   nonfinite_visible_confined and nonfinite_self_attention fail). mha's own layers zero non-finite
   keys/values before the product and mark only the rows that can see them.
"""

import os
import textwrap

import numpy as np

from mha.testing import check
from mha.testing.adapters import Adapter

FIXED = os.environ.get("MHA_EXAMPLE_FIXED", "0") == "1"


def my_attention(x_q, x_k, x_v, Wq, Wk, Wv, Wo, num_heads, keep=None):
    """x_q (B, T, E), x_k and x_v (B, S, E); keep (B, H, T, S) bool or None -> (B, T, E)."""
    B, T, E = x_q.shape
    S, D = x_k.shape[1], E // num_heads
    q = (x_q @ Wq.T).reshape(B, T, num_heads, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    k = (x_k @ Wk.T).reshape(B, S, num_heads, D).transpose(0, 2, 1, 3)  # (B, H, S, D)
    v = (x_v @ Wv.T).reshape(B, S, num_heads, D).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)  # (B, H, T, S)
    if keep is not None:
        s = np.where(keep, s, -np.inf if FIXED else -1e9)  # the bug: -1e9 turns an empty row into mean(V)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    denom = p.sum(-1, keepdims=True)
    p = p / np.where(denom == 0, 1, denom)  # a row with no visible key stays all-zero
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, T, E) @ Wo.T


def build(weights):
    """The adapter: our semantics (bool masks True = may attend) -> my_attention's arguments."""
    H = weights.num_heads

    def fn(query, key, value, *, mask=None):
        keep = None
        if mask is not None:
            B, T, S = query.shape[0], query.shape[1], key.shape[1]
            m = np.asarray(mask) != 0
            keep = np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), (B, H, T, S))
        f64 = np.float64
        return my_attention(query.astype(f64), key.astype(f64), value.astype(f64), weights.q_weight,
                            weights.k_weight, weights.v_weight, weights.o_weight, H, keep)

    return fn


def adapter():
    """What `mha check --impl examples/check_my_attention.py:adapter` calls. Features: a bool mask and
    cross-attention (key != query); no biases, no GQA, no returned weights."""
    return Adapter("my_attention", {"mask", "cross"}, build)


if __name__ == "__main__":
    report = check(adapter(), max_examples=60)
    print(report)
    if FIXED:
        assert report.failed == ["nonfinite_hidden_isolation", "nonfinite_visible_confined",
                                 "nonfinite_self_attention"], report.failed
    else:
        assert "empty_rows_output_bias" in report.failed, "the suite should catch the mean-of-values bug"
        assert "permutation_equivariance" in report.passed
    print(textwrap.fill("\nthe suite found: " + ", ".join(report.failed), 100, replace_whitespace=False))
