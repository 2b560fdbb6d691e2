"""The MLX backend on a GPU against mlx.nn.MultiHeadAttention and torch on the same card.

    python benchmarks/mlx_gpu.py [--quick] [--json out.json] [--only accuracy,speed,long,decode,parts]

Runs MLX on its default device (Metal on Apple silicon, CUDA with ``mlx[cuda]``) and torch on CUDA
(or MPS) when it has one. For each shape and dtype (float32, bfloat16) it times, after warm-up, the
median of back-to-back calls, each ending in a synchronisation (``mx.eval`` / ``torch.cuda.synchronize``):

- ``mha mlx``: this project's layer (fused ``mx.fast.scaled_dot_product_attention`` path);
- ``mlx.nn``: ``mlx.nn.MultiHeadAttention`` with the same weights;
- ``mha mlx +weights``: this project's layer asked for the weights (the op-by-op reference path);
- ``mlx naive``: matmul / softmax / matmul written out on MLX (what the fused path must beat);
- ``torch MHA``: ``torch.nn.MultiheadAttention`` (need_weights=False; eval + inference mode, so its
  fused fast path runs), and ``torch MHA +weights`` (need_weights=True, average_attn_weights=False);
- ``torch SDPA``: one QKV Linear, ``F.scaled_dot_product_attention``, the output Linear (FlashAttention
  kernels in half precision).

``accuracy`` compares both dtypes with a float64 numpy reference on the same weights (max error
relative to the output's largest magnitude), so that a kernel computing float32 products in TF32
shows. ``long`` reports peak memory at T=16384 (``mx.get_peak_memory`` / ``torch.cuda.max_memory_allocated``
above the inputs). ``decode`` times one token against a cache of 128 .. 16384 tokens. ``parts`` (not run
by default) splits one call into its pieces: projections, the bare kernel, the rules around it.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import mha  # noqa: E402

SHAPES = [(1, 512, 512, 8), (4, 1024, 768, 12), (1, 4096, 512, 8), (4, 4096, 1024, 16), (1, 16384, 2048, 16)]
QUICK_SHAPES = [(1, 64, 64, 4), (2, 128, 128, 4)]
WEIGHT_ROWS_MAX = 4096  # +weights rows up to this T (the weights alone are B*H*T*T floats)
LONG = (1, 16384, 512, 8)
DECODE = (512, 8)
DECODE_CONTEXTS = [128, 1024, 4096, 16384]
MX_DT = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def flops(B, T, E, H) -> float:
    """2 x multiply-adds of one self-attention layer: four E x E projections and the two attention GEMMs."""
    return 8.0 * B * T * E * E + 4.0 * B * T * T * E


def median_time(fn, repeat: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def torch_device():
    try:
        import torch
    except ImportError:
        return None, None
    if torch.cuda.is_available():
        return torch, "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch, "mps"
    return torch, "cpu"


def sync(torch, dev):
    if dev == "cuda":
        torch.cuda.synchronize()
    elif dev == "mps":
        torch.mps.synchronize()


def naive_mlx(E, H, p):
    """Attention written out on MLX: projections, matmul, softmax (float32), matmul."""
    D = E // H
    scale = 1.0 / math.sqrt(D)

    def fn(x):
        B, T, _ = x.shape
        q = (x @ p["q_weight"].T + p["q_bias"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = (x @ p["k_weight"].T + p["k_bias"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        v = (x @ p["v_weight"].T + p["v_bias"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        w = mx.softmax((q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale, axis=-1).astype(x.dtype)
        ctx = (w @ v).transpose(0, 2, 1, 3).reshape(B, T, E)
        return ctx @ p["o_weight"].T + p["o_bias"], w

    return fn


def layers(E, H, dtype, seed=0):
    """(weights, this project's MLX layer, mlx.nn layer, naive fn) sharing one set of weights."""
    weights = mha.AttentionWeights.init(E, H, seed=seed)
    mine = mha.MultiHeadAttention.from_weights(weights, backend="mlx", dtype=dtype)
    ref = nn.MultiHeadAttention(E, H, bias=True)
    w = weights.to_dict()
    ref.update({name: {"weight": mx.array(w[f"{p}_weight"]), "bias": mx.array(w[f"{p}_bias"])}
                for p, name in (("q", "query_proj"), ("k", "key_proj"), ("v", "value_proj"), ("o", "out_proj"))})
    ref.set_dtype(MX_DT[dtype])
    mx.eval(ref.parameters(), mine.parameters())
    p = {k: mx.array(v).astype(MX_DT[dtype]) for k, v in w.items() if v is not None}
    return weights, mine, ref, naive_mlx(E, H, p)


def torch_layers(torch, dev, weights, dtype):
    E, H = weights.embed_dim, weights.num_heads
    w = weights.to_dict()
    tdt = getattr(torch, dtype)
    tm = torch.nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        tm.in_proj_weight.copy_(torch.from_numpy(np.concatenate([w["q_weight"], w["k_weight"], w["v_weight"]])))
        tm.in_proj_bias.copy_(torch.from_numpy(np.concatenate([w["q_bias"], w["k_bias"], w["v_bias"]])))
        tm.out_proj.weight.copy_(torch.from_numpy(w["o_weight"]))
        tm.out_proj.bias.copy_(torch.from_numpy(w["o_bias"]))
    tm = tm.to(dev, tdt).eval()
    F = torch.nn.functional

    def sdpa(x):
        B, T, _ = x.shape
        qkv = F.linear(x, tm.in_proj_weight, tm.in_proj_bias).view(B, T, 3, H, E // H).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return F.linear(ctx.transpose(1, 2).reshape(B, T, E), tm.out_proj.weight, tm.out_proj.bias)

    return tm, sdpa


def speed(shapes, repeat, torch, dev):
    rows = []
    for B, T, E, H in shapes:
        for dtype in ("float32", "bfloat16"):
            weights, mine, ref, naive = layers(E, H, dtype)
            x = np.random.default_rng(1).standard_normal((B, T, E), dtype=np.float32)
            xm = mx.array(x).astype(MX_DT[dtype])
            impls = {
                "mha mlx": lambda: mx.eval(mine(xm)),
                "mlx.nn": lambda: mx.eval(ref(xm, xm, xm)),
            }
            if T <= WEIGHT_ROWS_MAX:
                impls["mha mlx +weights"] = lambda: mx.eval(*mine(xm, return_weights=True))
                impls["mlx naive"] = lambda: mx.eval(*naive(xm))
            if torch is not None:
                tm, sdpa = torch_layers(torch, dev, weights, dtype)
                xt = torch.from_numpy(x).to(dev, getattr(torch, dtype))

                def run(f):
                    def g():
                        with torch.inference_mode():
                            f()
                        sync(torch, dev)
                    return g

                impls["torch MHA"] = run(lambda: tm(xt, xt, xt, need_weights=False))
                if T <= WEIGHT_ROWS_MAX:
                    impls["torch MHA +weights"] = run(lambda: tm(xt, xt, xt, need_weights=True,
                                                                 average_attn_weights=False))
                impls["torch SDPA"] = run(lambda: sdpa(xt))
            times = {}
            for name, fn in impls.items():
                times[name] = median_time(fn, repeat)
            F = flops(B, T, E, H)
            row = {"shape": [B, T, E, H], "dtype": dtype, "gflop": F / 1e9,
                   "ms": {k: v * 1e3 for k, v in times.items()},
                   "tflops": {k: F / v / 1e12 for k, v in times.items()}}
            ratios = {"mha mlx / mlx.nn": ("mha mlx", "mlx.nn"),
                      "mha mlx / mlx naive": ("mha mlx", "mlx naive"),
                      "mha mlx +weights / mlx naive": ("mha mlx +weights", "mlx naive"),
                      "mha mlx / torch MHA": ("mha mlx", "torch MHA"),
                      "mha mlx / torch SDPA": ("mha mlx", "torch SDPA")}
            row["ratios"] = {k: times[a] / times[b] for k, (a, b) in ratios.items() if a in times and b in times}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del mine, ref, naive, impls
            mx.clear_cache()
    return rows


def accuracy(shapes, torch, dev):
    """Max |ours - float64 reference| / max |reference|, per dtype (and the same for mlx.nn, torch)."""
    rows = []
    for B, T, E, H in shapes:
        T = min(T, 2048)  # the float64 reference materialises B*H*T*T scores
        x = np.random.default_rng(2).standard_normal((B, T, E), dtype=np.float32)
        weights = mha.AttentionWeights.init(E, H, seed=3)
        exact = mha.MultiHeadAttention.from_weights(weights, backend="numpy", dtype="float64")
        want = exact(x.astype(np.float64))
        scale = float(np.abs(want).max())
        for dtype in ("float32", "bfloat16"):
            _, mine, ref, _ = layers(E, H, dtype, seed=3)
            xm = mx.array(x).astype(MX_DT[dtype])
            err = {"mha mlx": mine(xm), "mlx.nn": ref(xm, xm, xm)}
            err = {k: float(np.abs(mha.to_numpy(v).astype(np.float64) - want).max() / scale) for k, v in err.items()}
            if torch is not None:
                tm, sdpa = torch_layers(torch, dev, weights, dtype)
                xt = torch.from_numpy(x).to(dev, getattr(torch, dtype))
                with torch.inference_mode():
                    for name, out in (("torch MHA", tm(xt, xt, xt, need_weights=False)[0]), ("torch SDPA", sdpa(xt))):
                        got = out.float().cpu().numpy().astype(np.float64)
                        err[name] = float(np.abs(got - want).max() / scale)
            row = {"shape": [B, T, E, H], "dtype": dtype, "max_rel_err": err}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def long_memory(shape, repeat, torch, dev):
    B, T, E, H = shape
    rows = []
    for dtype in ("float32", "bfloat16"):
        weights, mine, ref, _ = layers(E, H, dtype)
        x = np.random.default_rng(1).standard_normal((B, T, E), dtype=np.float32)
        xm = mx.array(x).astype(MX_DT[dtype])
        mx.eval(xm)
        row = {"shape": list(shape), "dtype": dtype, "input_mib": xm.nbytes / 2**20}
        for name, fn in (("mha mlx", lambda: mx.eval(mine(xm))), ("mlx.nn", lambda: mx.eval(ref(xm, xm, xm)))):
            fn()
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            t = median_time(fn, repeat, warm=1)
            row[name] = {"ms": t * 1e3, "peak_above_inputs_mib": (mx.get_peak_memory() - base) / 2**20}
        if torch is not None and dev == "cuda":
            tm, sdpa = torch_layers(torch, dev, weights, dtype)
            xt = torch.from_numpy(x).to(dev, getattr(torch, dtype))
            for name, f in (("torch MHA", lambda: tm(xt, xt, xt, need_weights=False)), ("torch SDPA", lambda: sdpa(xt))):
                def g(f=f):
                    with torch.inference_mode():
                        f()
                    torch.cuda.synchronize()
                g()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t = median_time(g, repeat, warm=1)
                row[name] = {"ms": t * 1e3, "peak_above_inputs_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del mine, ref
        mx.clear_cache()
    return rows


def decode(contexts, repeat, torch, dev):
    E, H = DECODE
    D = E // H
    rows = []
    for context in contexts:
        for dtype in ("float32", "bfloat16"):
            steps = repeat + 3
            rng = np.random.default_rng(0)
            prompt = rng.standard_normal((1, context, E), dtype=np.float32)
            token = rng.standard_normal((1, 1, E), dtype=np.float32)
            weights = mha.AttentionWeights.init(E, H, seed=0)
            layer = mha.MultiHeadAttention.from_weights(weights, backend="mlx", dtype=dtype)
            cache = layer.init_cache(1, context + steps)
            mx.eval(layer(mx.array(prompt).astype(MX_DT[dtype]), cache=cache, causal=True))
            mtoken = mx.array(token).astype(MX_DT[dtype])
            times = {"mha mlx": median_time(lambda: mx.eval(layer(mtoken, cache=cache, causal=True)), repeat)}
            if torch is not None:
                tdt = getattr(torch, dtype)
                tm, _ = torch_layers(torch, dev, weights, dtype)
                F = torch.nn.functional
                kbuf = torch.zeros(1, H, context + steps, D, device=dev, dtype=tdt)
                vbuf = torch.zeros_like(kbuf)
                n = [context]
                xt = torch.from_numpy(token).to(dev, tdt)

                def torch_step():
                    with torch.inference_mode():
                        q, k, v = F.linear(xt, tm.in_proj_weight, tm.in_proj_bias).view(1, 1, 3, H, D).permute(2, 0, 3, 1, 4)
                        i = n[0]
                        kbuf[:, :, i:i + 1], vbuf[:, :, i:i + 1] = k, v
                        n[0] += 1
                        ctx = F.scaled_dot_product_attention(q, kbuf[:, :, :i + 1], vbuf[:, :, :i + 1])
                        F.linear(ctx.reshape(1, 1, E), tm.out_proj.weight, tm.out_proj.bias)
                    sync(torch, dev)

                times["torch SDPA + cache"] = median_time(torch_step, repeat)
            row = {"context": context, "E": E, "H": H, "dtype": dtype, "ms": {k: v * 1e3 for k, v in times.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def parts(shapes, repeat):
    """Where the time of one call goes: the whole layers, then the pieces of the fused path alone."""
    import mha_mlx

    rows = []
    for B, T, E, H in shapes:
        for dtype in ("float32", "bfloat16"):
            _, mine, ref, _ = layers(E, H, dtype)
            xm = mx.array(np.random.default_rng(1).standard_normal((B, T, E), dtype=np.float32)).astype(MX_DT[dtype])
            p = mine._native_params()
            D = E // H
            scale = 1.0 / math.sqrt(D)

            def heads(y):
                return y.reshape(B, T, H, D).transpose(0, 2, 1, 3)

            def out(ctx):
                return mx.addmm(p["o_bias"], ctx.transpose(0, 2, 1, 3).reshape(B, T, E), p["o_weight"].T)

            def bare_addmm():
                q, k, v = (heads(mx.addmm(p[f"{n}_bias"], xm, p[f"{n}_weight"].T)) for n in "qkv")
                return out(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))

            def bare_fused_qkv():
                w = mx.concatenate([p["q_weight"], p["k_weight"], p["v_weight"]])
                b = mx.concatenate([p["q_bias"], p["k_bias"], p["v_bias"]])
                qkv = mx.addmm(b, xm, w.T).reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)
                return out(mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=scale))

            qp, kp, vp = (mx.addmm(p[f"{n}_bias"], xm, p[f"{n}_weight"].T) for n in "qkv")
            q, k, v = heads(qp), heads(kp), heads(vp)
            mx.eval(q, k, v)

            def uncompiled(fn):
                def run():
                    mha_mlx.options.compile = False
                    try:
                        return fn()
                    finally:
                        mha_mlx.options.compile = True
                return run

            def flags(k, v):  # the NaN/inf detector's arithmetic (mha_mlx._nonfinite), timed alone
                return mx.isnan((k * 0 + v * 0).sum(axis=-1))

            variants = {
                "mlx.nn": lambda: ref(xm, xm, xm),
                "mha mlx": lambda: mine(xm),
                "mha mlx uncompiled": uncompiled(lambda: mine(xm)),
                "addmm + sdpa": bare_addmm,
                "fused qkv addmm + sdpa": bare_fused_qkv,
                "kernel sdpa": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale),
                "kernel fused_attention": lambda: mha_mlx.fused_attention(q, k, v, scale=scale),
                "kernel fused_attention uncompiled": uncompiled(lambda: mha_mlx.fused_attention(q, k, v, scale=scale)),
                "flags on heads": lambda: flags(k, v),
                "flags per key on projections": lambda: flags(kp.reshape(B, T, H, D), vp.reshape(B, T, H, D)),
                "flags per batch element": lambda: mx.any(flags(kp, vp), axis=-1),
                "kernel sdpa causal": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
                "kernel fused_attention causal": lambda: mha_mlx.fused_attention(q, k, v, scale=scale, causal=True),
            }
            ms = {name: median_time(lambda f=f: mx.eval(f()), repeat) * 1e3 for name, f in variants.items()}
            row = {"shape": [B, T, E, H], "dtype": dtype, "ms": ms}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--only", default="accuracy,speed,long,decode")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--shapes", help="B,T,E,H;B,T,E,H... instead of the built-in shapes")
    a = ap.parse_args(argv)
    torch, dev = torch_device()
    if torch is not None and dev == "cpu" and not a.quick:
        torch = None  # a CPU torch is not a comparison on the same device
    repeat = a.repeat or (3 if a.quick else 20)
    info = {"platform": platform.platform(), "python": platform.python_version(), "mlx": mx.__version__,
            "mlx_device": str(mx.default_device()), "torch": getattr(torch, "__version__", None),
            "torch_device": dev if torch is not None else None}
    if torch is not None and dev == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["torch_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    print(json.dumps(info), flush=True)
    report = {"info": info}
    only = set(a.only.split(","))
    shapes = QUICK_SHAPES if a.quick else SHAPES
    if a.shapes:
        shapes = [tuple(int(n) for n in s.split(",")) for s in a.shapes.split(";")]
    if "parts" in only:
        report["parts"] = parts(shapes[:4], repeat)
    if "accuracy" in only:
        report["accuracy"] = accuracy(shapes[:3], torch, dev)
    if "speed" in only:
        report["speed"] = speed(shapes, repeat, torch, dev)
    if "long" in only:
        report["long"] = long_memory((1, 256, 64, 4) if a.quick else LONG, max(3, repeat // 4), torch, dev)
    if "decode" in only:
        report["decode"] = decode([16, 64] if a.quick else DECODE_CONTEXTS, repeat * 5, torch, dev)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
