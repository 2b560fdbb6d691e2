"""Where one decode step of the numpy layer goes: the whole call and its parts, timed in one process.

    python benchmarks/decode_parts.py                     # E=512, H=8, context 200
    python benchmarks/decode_parts.py --llama 2 --context 300   # the decoder models' layer (GQA, RoPE, no biases)

Each part is called on its own, 3000 times, with the cache moved back one position after each step so
that the context stays fixed; the figure is the tenth percentile in microseconds (the quiet runs of a
shared machine). The parts overlap the call as a sum only roughly (their own setup is timed with them).
BLAS is held at one thread for the parts, as a step on the calling thread holds it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import mha
from mha import _prepare
from mha_cpu import _kernel
from mha_cpu._workers import Workers, blas_threads


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
    rng = np.random.default_rng(0)
    cache = layer.init_cache(1, args.context + 10)
    layer(rng.standard_normal((1, args.context, 512), dtype=np.float32), cache=cache, causal=True)
    x = rng.standard_normal((1, 1, 512), dtype=np.float32)

    def back():  # the step's token forgotten: the next step sees the same context
        cache.offset -= 1
        cache._end -= 1

    def prepare():
        return _prepare.prepare(layer, x, None, None, mask=None, key_mask=None, causal=True, head_mask=None,
                                return_weights=False, training=False, check_finite=False, return_lse=False,
                                cache=cache)

    n, res = args.steps, {}
    res["layer call"] = tenth(lambda: (layer(x, cache=cache, causal=True), back()), n)
    res["front end (prepare)"] = tenth(prepare, n)
    call = prepare()
    res["_forward"] = tenth(lambda: (layer._forward(call), back()), n)
    with blas_threads(1), Workers(1.0) as w:
        res["Q/K/V projection"] = tenth(lambda: layer._proj.heads(call, w), n)
        res["  Q/K/V GEMV alone"] = tenth(lambda: x[0] @ layer._proj.form["qkv"][0], n)
        q, k, v = layer._heads(*layer._proj.heads(call, w), call.pos)
        res["heads (q/k norm, RoPE)"] = tenth(lambda: layer._heads(*layer._proj.heads(call, w), call.pos), n) \
            - res["Q/K/V projection"]
        res["cache append + finite check"] = tenth(lambda: (call.pos.step.append(
            k, v, _kernel.all_finite(k) and _kernel.all_finite(v)), back()), n)
        keys, values = call.pos.step.append(k, v, True)
        back()
        res["core (mha_cpu.attend)"] = tenth(lambda: _kernel.attend(q, keys, values, call.masks, scale=1.0,
                                                                    finite=True), n)
        ctx, out = np.ones((1, 1, 512), np.float32), np.empty((1, 1, 512), np.float32)
        res["W_O projection"] = tenth(lambda: w.linear(ctx, layer._proj.o_weight_t, layer._params["o_bias"], out), n)
        res["  W_O GEMV alone"] = tenth(lambda: ctx[0] @ layer._proj.o_weight_t, n)
    for name, us in res.items():
        print(f"{name:32s} {us:7.1f} us")
    return res


if __name__ == "__main__":
    main()
