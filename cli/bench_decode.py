"""Decode-step rows of ``mha bench``: time per token against a KV cache, the bytes each step must read
(as GB/s, next to this machine's measured copy bandwidth), and the per-call overhead (the same step on a
layer so small that its arithmetic takes a few microseconds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import click

DECODE = (512, 8, 8)  # E, H, num_kv_heads of the decode-step rows
TINY = (16, 2, 2, 16)  # E, H, num_kv_heads, context of the overhead row
NAMES = ("mha numpy", "torch SDPA + cache", "mha mlx")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def copy_bandwidth(mib: int = 256) -> float:
    """GB/s of a large float32 copy (bytes read + bytes written), best of 3: what a pass over memory
    can reach on this machine."""
    import numpy as np

    a = np.ones(mib << 18, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    return 2 * a.nbytes / min(_time(lambda: np.copyto(b, a)) for _ in range(3)) / 1e9


def step_bytes(context: int, E: int, H: int, Hkv: int) -> int:
    """Bytes a float32 decode step must read at least: the Q/K/V and output weights, and the cached keys
    and values it attends over."""
    D = E // H
    return 4 * (E * (H + 2 * Hkv) * D + E * H * D + 2 * (context + 1) * Hkv * D)


def _decode_impls(context: int, want_mlx: bool, steps: int, dims=DECODE):
    """name -> a callable that decodes one more token (the cache prefilled with ``context`` tokens)."""
    import numpy as np

    import mha

    E, H, Hkv = dims
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, context, E), dtype=np.float32)
    token = rng.standard_normal((1, 1, E), dtype=np.float32)
    weights = mha.AttentionWeights.init(E, H, num_kv_heads=Hkv, seed=0)
    impls = {}
    layer = mha.MultiHeadAttention.from_weights(weights, backend="numpy")
    cache = layer.init_cache(1, context + steps)
    layer(prompt, cache=cache, causal=True)
    impls["mha numpy"] = lambda: layer(token, cache=cache, causal=True)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    if torch is not None:  # what a torch user writes: preallocated K/V buffers and SDPA over the filled part
        D = E // H  # parameters without grad: no graph recorded, the caller's grad mode untouched
        qkv, out = torch.nn.Linear(E, 3 * E).requires_grad_(False), torch.nn.Linear(E, E).requires_grad_(False)
        kbuf, vbuf = torch.zeros(1, H, context + steps, D), torch.zeros(1, H, context + steps, D)
        q, k, v = qkv(torch.from_numpy(prompt)).view(1, -1, 3, H, D).permute(2, 0, 3, 1, 4)
        kbuf[:, :, :context], vbuf[:, :, :context] = k, v
        n = [context]
        xt = torch.from_numpy(token)

        def torch_step():
            q, k, v = qkv(xt).view(1, 1, 3, H, D).permute(2, 0, 3, 1, 4)
            i = n[0]
            kbuf[:, :, i:i + 1], vbuf[:, :, i:i + 1] = k, v
            n[0] += 1
            return out(F.scaled_dot_product_attention(q, kbuf[:, :, :i + 1], vbuf[:, :, :i + 1]).reshape(1, 1, E))

        impls["torch SDPA + cache"] = torch_step
    if want_mlx:
        import mlx.core as mx

        ml = layer.to("mlx")
        mcache = ml.init_cache(1, context + steps)
        mx.eval(ml(mx.array(prompt), cache=mcache, causal=True))
        mtoken = mx.array(token)
        impls["mha mlx"] = lambda: mx.eval(ml(mtoken, cache=mcache, causal=True))
    return impls


def time_decode(context: int, name: str, repeat: int, want_mlx: bool, dims=DECODE) -> list[float]:
    """Seconds per decoded token: 3 warm-up steps, then ``repeat`` steps (the context grows by one each)."""
    fn = _decode_impls(context, want_mlx, repeat + 3, tuple(dims))[name]
    for _ in range(3):
        fn()
    return [_time(fn) for _ in range(repeat)]


def _times(context, name, repeat, want_mlx, isolate, dims) -> list[float]:
    if not isolate:
        return time_decode(context, name, repeat, want_mlx, dims)
    code = ("import json, sys; from mha_cli.bench_decode import time_decode; "
            "print(json.dumps(time_decode(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), "
            "sys.argv[4] == '1', json.loads(sys.argv[5]))))")
    res = subprocess.run([sys.executable, "-c", code, str(context), name, str(repeat), "1" if want_mlx else "0",
                          json.dumps(list(dims))], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise click.ClickException(f"decode timing of {name} at {context} failed: "
                                   f"{res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_decode(context: int, repeat: int, want_mlx: bool, isolate: bool = True, rounds: int = 1,
                   dims=DECODE) -> dict:
    """Median time per token of one decode step (a single new token against a cache of ``context``
    tokens), each implementation in processes of its own taking turns over ``rounds``."""
    import numpy as np

    # the names without building anything here: this process's library threads would share the cores
    names = [n for n in NAMES if (n != "torch SDPA + cache" or importlib.util.find_spec("torch"))
             and (n != "mha mlx" or want_mlx)]
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            times[name] += _times(context, name, repeat, want_mlx, isolate, dims)
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    E, H, Hkv = dims
    nbytes = step_bytes(context, E, H, Hkv)
    rows = {}
    for name, t in med.items():
        base = "torch SDPA + cache" if name == "mha numpy" and "torch SDPA + cache" in med else None
        rows[name] = {"ms": t * 1e3, "tokens_per_s": 1.0 / t, "gbs": nbytes / t / 1e9, "vs": base,
                      "ratio": t / med[base] if base else None}
    return {"context": context, "E": E, "H": H, "num_kv_heads": Hkv, "bytes": nbytes, "results": rows}


def measure_overhead(repeat: int, isolate: bool = True, rounds: int = 1) -> dict:
    """The decode step on a layer of E=16, H=2 with 16 cached tokens: its arithmetic is a few hundred
    FLOPs, so its time is what every call costs beyond the arithmetic (checks, dispatch, allocation)."""
    E, H, Hkv, context = TINY
    blk = measure_decode(context, repeat, False, isolate, rounds, (E, H, Hkv))
    return {"E": E, "H": H, "context": context,
            "results": {n: {"us": r["ms"] * 1e3, "vs": r["vs"], "ratio": r["ratio"]}
                        for n, r in blk["results"].items()}}
