"""Where one decode step of the numpy layer goes: the whole call and its numpy parts, timed in one process.

    python benchmarks/decode_parts.py                           # E=512, H=8, context 200
    python benchmarks/decode_parts.py --llama 2 --context 300   # the decoder models' layer (GQA, RoPE, no biases)

The step runs against a rotating cache of ``context`` + 1 positions, so that every step sees the same
number of keys. Each part is called on its own with public names, on the step's own shapes: the two
GEMVs alone, RoPE on the token's query and key heads (``mha.reference.apply_rope``, one call as the
layer makes), and the core (``mha_cpu.attend``) on the cache's keys; "the rest" is the call less those
(the front end, the projections' and the cache's bookkeeping, the worker context). Figures: the tenth
percentile of ``--steps`` calls in microseconds (the quiet runs of a shared machine), BLAS at one thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import mha
import mha_cpu


def tenth(fn, n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * sorted(ts)[n // 10]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--llama", type=int, default=0, metavar="HKV", help="HKV key/value heads, RoPE, no biases")
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args(argv)
    extra = dict(num_kv_heads=args.llama, bias=False, rope=True) if args.llama else {}
    layer = mha.MultiHeadAttention(512, 8, backend="numpy", seed=0, **extra)
    H, Hkv, D, S = layer.num_heads, layer.num_kv_heads, layer.head_dim, args.context + 1
    rng = np.random.default_rng(0)
    cache = layer.init_cache(1, max_cache=S)
    layer(rng.standard_normal((1, S + 2, 512), dtype=np.float32), cache=cache, causal=True)
    x = rng.standard_normal((1, 1, 512), dtype=np.float32)
    w = layer.weights
    wqkv = np.ascontiguousarray(np.concatenate([w.q_weight, w.k_weight, w.v_weight]).T)
    wo = np.ascontiguousarray(w.o_weight.T)
    n, res = args.steps, {}
    with threadpool_limits(1):
        res["layer call"] = tenth(lambda: layer(x, cache=cache, causal=True), n)
        res["Q/K/V GEMV"] = tenth(lambda: x[0] @ wqkv, n)
        qk = rng.standard_normal((1, H + Hkv, 1, D), dtype=np.float32)
        if layer.rope is not None:
            res["RoPE (q and k heads)"] = tenth(lambda: mha.reference.apply_rope(np, qk, layer.rope, S, np.float32), n)
        q = qk[:, :H] * np.float32(0.05)  # logits of a trained layer's size: the core's band holds (no recentring)
        keys, values = cache.keys[:, :, :S], cache.values[:, :, :S]  # (S keys of the buffer: the same sizes)
        masks = mha.reference.MaskSet(None, None, False, None, range(S - 1, S), range(S))
        res["core (mha_cpu.attend)"] = tenth(lambda: mha_cpu.attend(q, keys, values, masks, scale=1.0, finite=True), n)
        res["W_O GEMV"] = tenth(lambda: x[0] @ wo, n)
    res["the rest"] = res["layer call"] - sum(v for k, v in res.items() if k != "layer call")
    for name, us in res.items():
        print(f"{name:24s} {us:7.1f} us")
    return res


if __name__ == "__main__":
    main()
