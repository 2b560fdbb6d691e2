"""``mha bench``: timings and ratios against torch and mlx.nn, measured in one run.

Every number is a median over repeats after warm-up; each implementation runs in a process of its own
(except with --quick), so that no library's lingering worker threads slow another. Ratios are
ours / theirs from the same run; the numpy sgemm rate of the same run is the machine's limit for the GFLOP/s column.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import click

from ._util import note

SHAPES = [(1, 512, 512, 8), (4, 1024, 768, 12), (1, 4096, 512, 8)]
QUICK_SHAPES = [(1, 64, 64, 4), (2, 128, 128, 4)]
LONG = (1, 16384, 512, 8)
DECODE = (512, 8, 8)  # E, H, num_kv_heads of the decode-step rows
DECODE_CONTEXTS = [128, 1024, 4096]
QUICK_DECODE_CONTEXTS = [16, 64]


def flops(B, T, E, H, S=None) -> float:
    """Multiply-adds x 2 of one self-attention layer: Q/K/V/O projections and the two attention GEMMs."""
    S = T if S is None else S
    return 2.0 * B * T * E * E * 2 + 2.0 * B * S * E * E * 2 + 4.0 * B * T * S * E


def sgemm_rate(n: int) -> float:
    """GFLOP/s of numpy's float32 matrix product (n x n x n), best of 3."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(3))
    return 2.0 * n**3 / best / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _impls(B, T, E, H, want_mlx: bool):
    """name -> zero-argument callable, for the implementations installed here."""
    import numpy as np

    import mha

    x = np.random.default_rng(0).standard_normal((B, T, E), dtype=np.float32)
    weights = mha.AttentionWeights.init(E, H, seed=0)
    ours = mha.MultiHeadAttention.from_weights(weights, backend="numpy")
    impls = {
        "mha numpy": lambda: ours(x),
        "mha numpy +weights": lambda: ours(x, return_weights=True),
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_grad_enabled(False)
        tm = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
        xt = torch.from_numpy(x)
        impls["torch"] = lambda: tm(xt, xt, xt, need_weights=False)
        impls["torch +weights"] = lambda: tm(xt, xt, xt, need_weights=True, average_attn_weights=False)
    if want_mlx:
        import mlx.core as mx
        import mlx.nn as nn

        xm = mx.array(x)
        ref = nn.MultiHeadAttention(E, H, bias=True)
        mx.eval(ref.parameters())
        mine = mha.MultiHeadAttention.from_weights(mha.AttentionWeights.from_mlx(ref), backend="mlx")
        impls["mlx.nn"] = lambda: mx.eval(ref(xm, xm, xm))
        impls["mha mlx"] = lambda: mx.eval(mine(xm))
        impls["mha mlx +weights"] = lambda: mx.eval(*mine(xm, return_weights=True))
    return impls


def time_one(shape, name: str, repeat: int, want_mlx: bool) -> list[float]:
    """Seconds per call of one implementation: warm-up, then ``repeat`` calls back to back."""
    fn = _impls(*shape, want_mlx)[name]
    fn()
    fn()  # warm-up: allocations, thread pools, kernels, compiled graphs
    return [_time(fn) for _ in range(repeat)]


def times_of(shape, name: str, repeat: int, want_mlx: bool, isolate: bool) -> list[float]:
    """time_one, in a process of its own with ``isolate``."""
    if not isolate:
        return time_one(shape, name, repeat, want_mlx)
    code = ("import json, sys; from mha_cli.bench import time_one; "
            "print(json.dumps(time_one(tuple(json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3]), "
            "sys.argv[4] == '1')))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(list(shape)), name, str(repeat),
                          "1" if want_mlx else "0"], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise click.ClickException(f"timing {name} at {shape} failed: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(shape, repeat: int, want_mlx: bool, isolate: bool = True, rounds: int = 1) -> dict:
    """Median time of every implementation at ``shape``, over ``rounds`` x ``repeat`` calls.

    With ``isolate`` each implementation runs in a fresh process: libraries leave worker threads
    spinning after a call (torch's OpenMP, OpenBLAS, MLX's CPU pool), which slows whatever runs next on
    the same cores (measured: ours took 16 ms instead of 9 at B=1, T=512 when interleaved call by call
    with torch). ``--quick`` measures in this process. With ``rounds`` > 1 the implementations take
    turns (a process each per round), so that a machine whose speed drifts over seconds (seen on shared
    virtual machines: the same call 10 ms for a while, then 15) slows them alike rather than whichever
    ran during the slow spell.
    """
    import numpy as np

    names = list(_impls(*(1, 4, 8, 2), want_mlx))  # the names only (a tiny instance)
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            times[name] += times_of(shape, name, repeat, want_mlx, isolate)
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    B, T, E, H = shape
    F = flops(B, T, E, H)
    rows = {}
    for name, t in med.items():
        base = {"mha numpy": "torch", "mha numpy +weights": "torch +weights", "mha mlx": "mlx.nn",
                "mha mlx +weights": "mlx.nn"}.get(name)
        rows[name] = {"ms": t * 1e3, "gflops": F / t / 1e9,
                      "vs": base if base in med else None,
                      "ratio": t / med[base] if base in med else None}
    return {"shape": {"B": B, "T": T, "E": E, "H": H}, "gflop": F / 1e9, "results": rows}


_LONG_CODE = r"""
import json, sys, time, resource
import numpy as np
which, B, T, E, H, repeat = sys.argv[1], *map(int, sys.argv[2:])
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
x = np.random.default_rng(0).standard_normal((B, T, E), dtype=np.float32)
if which == "mha":
    import mha
    layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=0)
    fn = lambda: layer(x)
    layer(x[:, :256])
else:  # the same layer on torch's fused SDPA kernel (nn.MultiheadAttention takes its math path here)
    import torch
    import torch.nn.functional as F
    torch.set_grad_enabled(False)
    qkv, out = torch.nn.Linear(E, 3 * E), torch.nn.Linear(E, E)
    xt = torch.from_numpy(x)
    def fn(x=xt):
        q, k, v = qkv(x).view(B, -1, 3, H, E // H).permute(2, 0, 3, 1, 4)
        return out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, E))
    fn(xt[:, :256])
base = hwm()
ts = []
for _ in range(repeat):
    t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
print(json.dumps({"s": float(np.median(ts)), "peak_mib": (hwm() - base) / 2**20,
                  "input_mib": x.nbytes / 2**20}))
"""


def measure_long(repeat: int) -> dict:
    """T=16384 self-attention, each implementation in a fresh process so that its peak memory (the
    high-water mark above the inputs) is its own. torch runs the same layer (fused QKV Linear, SDPA,
    output Linear) on F.scaled_dot_product_attention's fused kernel: its nn.MultiheadAttention takes the
    math path at this size on the CPU and needs over 8 GiB."""
    B, T, E, H = LONG
    out = {"shape": {"B": B, "T": T, "E": E, "H": H}, "gflop": flops(B, T, E, H) / 1e9, "results": {}}
    for which, name in (("mha", "mha numpy"), ("torch", "torch SDPA")):
        if which == "torch":
            try:
                import torch  # noqa: F401
            except ImportError:
                continue
        res = subprocess.run([sys.executable, "-c", _LONG_CODE, which, str(B), str(T), str(E), str(H),
                              str(repeat)], capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise click.ClickException(f"long-sequence run of {name} failed: {res.stderr.strip().splitlines()[-1]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        out["results"][name] = {"ms": r["s"] * 1e3, "gflops": out["gflop"] / r["s"], "peak_mib": r["peak_mib"]}
    res = out["results"]
    if "torch SDPA" in res:
        res["mha numpy"]["vs"] = "torch SDPA"
        res["mha numpy"]["ratio"] = res["mha numpy"]["ms"] / res["torch SDPA"]["ms"]
    return out


def _decode_impls(context: int, want_mlx: bool, steps: int):
    """name -> a callable that decodes one more token (the cache prefilled with ``context`` tokens)."""
    import numpy as np

    import mha

    E, H, Hkv = DECODE
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
        torch.set_grad_enabled(False)
        D = E // H
        qkv, out = torch.nn.Linear(E, 3 * E), torch.nn.Linear(E, E)
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


def time_decode(context: int, name: str, repeat: int, want_mlx: bool) -> list[float]:
    """Seconds per decoded token: 3 warm-up steps, then ``repeat`` steps (the context grows by one each)."""
    fn = _decode_impls(context, want_mlx, repeat + 3)[name]
    for _ in range(3):
        fn()
    return [_time(fn) for _ in range(repeat)]


def measure_decode(context: int, repeat: int, want_mlx: bool, isolate: bool = True) -> dict:
    """Time per token of one decode step (a single new token against a cache of ``context`` tokens)."""
    import numpy as np

    # the names without building anything here: this process's library threads would share the cores
    names = ["mha numpy"] + (["torch SDPA + cache"] if importlib.util.find_spec("torch") else []) + \
        (["mha mlx"] if want_mlx else [])
    med = {}
    for name in names:
        if not isolate:
            ts = time_decode(context, name, repeat, want_mlx)
        else:
            code = ("import json, sys; from mha_cli.bench import time_decode; "
                    "print(json.dumps(time_decode(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), "
                    "sys.argv[4] == '1')))")
            res = subprocess.run([sys.executable, "-c", code, str(context), name, str(repeat),
                                  "1" if want_mlx else "0"], capture_output=True, text=True, timeout=3600)
            if res.returncode != 0:
                raise click.ClickException(f"decode timing of {name} at {context} failed: "
                                           f"{res.stderr.strip().splitlines()[-1]}")
            ts = json.loads(res.stdout.strip().splitlines()[-1])
        med[name] = float(np.median(ts))
    rows = {}
    for name, t in med.items():
        base = "torch SDPA + cache" if name == "mha numpy" and "torch SDPA + cache" in med else None
        rows[name] = {"ms": t * 1e3, "tokens_per_s": 1.0 / t, "vs": base,
                      "ratio": t / med[base] if base else None}
    E, H, Hkv = DECODE
    return {"context": context, "E": E, "H": H, "num_kv_heads": Hkv, "results": rows}


@click.command()
@click.option("--quick", is_flag=True,
              help="Tiny shapes, few repeats, no long sequence, all in one process: a smoke run (times, no ratios).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--repeat", type=click.IntRange(1, 1000), default=None, help="Timed repeats per implementation.")
@click.option("--rounds", type=click.IntRange(1, 100), default=None,
              help="Turns each implementation takes at every shape, a fresh process each (default 3, 1 with --quick); "
                   "the median is over all of them.")
@click.option("--long/--no-long", "long_", default=None,
              help="Also time T=16384 (E=512, H=8) with peak memory (default: on unless --quick).")
@click.option("--mlx/--no-mlx", "use_mlx", default=None,
              help="Include MLX rows (default: when MLX is installed; on a CPU-only Linux MLX has no BLAS, so "
                   "only shapes up to 1024 tokens are run there).")
def bench(quick, as_json, repeat, rounds, long_, use_mlx):
    """Time this project's layers against torch.nn.MultiheadAttention and mlx.nn.MultiHeadAttention.

    Prints, per shape (B, T, E, H): median ms, GFLOP/s, and ours/theirs ratios measured in this run,
    plus the numpy sgemm rate of this machine. Benchmarks are measurements, not tests: nothing is
    asserted about the times.
    """
    import mha

    info = mha.backend_info()
    repeat = repeat or (3 if quick else 15)
    rounds = rounds or (1 if quick else 3)
    shapes = QUICK_SHAPES if quick else SHAPES
    long_ = (not quick) if long_ is None else long_
    has_mlx = "mlx" in mha.available_backends()
    if use_mlx and not has_mlx:
        raise click.ClickException(f"--mlx needs MLX: {info['mlx']['install']}")
    use_mlx = has_mlx if use_mlx is None else use_mlx
    mlx_gpu = info["mlx"]["gpu"]
    report = {"machine": {"platform": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
                          "python": platform.python_version(), "mlx_device": info["mlx"]["device"]},
              "repeat": repeat, "rounds": rounds, "sgemm_gflops": None, "shapes": [], "long": None, "decode": []}
    contexts = QUICK_DECODE_CONTEXTS if quick else DECODE_CONTEXTS
    steps = (["sgemm"] + [f"{s}" for s in shapes] + [f"decode {c}" for c in contexts]
             + (["long"] if long_ else []))
    with click.progressbar(steps, label="mha bench", file=sys.stderr) as bar:
        for step in bar:
            if step == "sgemm":
                report["sgemm_gflops"] = sgemm_rate(1024 if quick else 4096)
            elif step == "long":
                report["long"] = measure_long(1 if quick else 3)
            elif step.startswith("decode"):
                report["decode"].append(measure_decode(int(step.split()[1]), 10 if quick else 50, use_mlx,
                                                       isolate=not quick))
            else:
                shape = shapes[steps.index(step) - 1]
                want = use_mlx and (mlx_gpu or shape[0] * shape[1] <= 1024)
                report["shapes"].append(measure(shape, repeat, want, isolate=not quick, rounds=rounds))
    # every FLOP at this run's sgemm rate: the time no implementation built on this BLAS goes below
    for blk in report["shapes"] + ([report["long"]] if report["long"] else []):
        blk["floor_ms"] = blk["gflop"] / report["sgemm_gflops"] * 1e3
    if quick:
        _drop_ratios(report)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    _print(report)


QUICK_NOTE = ("quick run: every implementation is timed for a few calls in this one process, where the others' "
              "thread pools compete for the cores, so these times are a smoke test, not a comparison, and no "
              "ratios are given; mha bench without --quick times each implementation in a process of its own")


def _drop_ratios(report: dict) -> None:
    """--quick: no ratio of the in-process timings survives (see QUICK_NOTE); the report says why. (The
    long row, if asked for, runs in processes of its own and keeps its ratio.)"""
    for blk in report["shapes"] + report["decode"]:
        for row in blk["results"].values():
            if row.get("ratio") is not None:
                row["ratio"] = None
    report["ratios_note"] = QUICK_NOTE


def _print(report: dict) -> None:
    m = report["machine"]
    click.echo(f"{m['platform']}, {m['cpus']} CPUs, Python {m['python']}, MLX device: {m['mlx_device']}; "
               f"medians of {report['rounds']} x {report['repeat']} repeats (rounds x calls)")
    click.echo(f"numpy sgemm (this run): {report['sgemm_gflops']:.0f} GFLOP/s")
    blocks = report["shapes"] + ([report["long"]] if report["long"] else [])
    for blk in blocks:
        s = blk["shape"]
        click.echo(f"\nB={s['B']} T={s['T']} E={s['E']} H={s['H']}  ({blk['gflop']:.2f} GFLOP per call: "
                   f"{blk['floor_ms']:.2f} ms at the sgemm rate)")
        for name, r in blk["results"].items():
            ratio = f"  {r['ratio']:.2f}x {r['vs']}" if r.get("ratio") else ""
            mem = f"  peak {r['peak_mib']:.0f} MiB above inputs" if "peak_mib" in r else ""
            util = f" ({100 * r['gflops'] / report['sgemm_gflops']:.0f}% of sgemm)" if name.startswith("mha numpy") \
                else ""
            click.echo(f"  {name:<20} {r['ms']:>10.2f} ms  {r['gflops']:>7.1f} GFLOP/s{util}{ratio}{mem}")
    if report["decode"]:
        d = report["decode"][0]
        click.echo(f"\ndecode step: one new token against a KV cache (B=1, E={d['E']}, H={d['H']}, "
                   f"num_kv_heads={d['num_kv_heads']}), time per token")
        for blk in report["decode"]:
            for name, r in blk["results"].items():
                ratio = f"  {r['ratio']:.2f}x {r['vs']}" if r.get("ratio") else ""
                click.echo(f"  context {blk['context']:>5}  {name:<20} {r['ms']:>8.3f} ms  "
                           f"{r['tokens_per_s']:>8.0f} tokens/s{ratio}")
    if report.get("ratios_note"):
        click.echo(f"\n{report['ratios_note']}")
    else:
        note("ratios < 1: ours is faster; every figure comes from this one run")
