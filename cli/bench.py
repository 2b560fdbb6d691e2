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

from ._util import Progress, note
from .bench_decode import copy_bandwidth, measure_decode, measure_overhead

SHAPES = [(1, 512, 512, 8), (4, 1024, 768, 12), (1, 4096, 512, 8)]
QUICK_SHAPES = [(1, 64, 64, 4), (2, 128, 128, 4)]
LONG = (1, 16384, 512, 8)
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


def cpu_model() -> str:
    """The CPU's model name as the OS reports it."""
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or platform.processor()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> str:
    """numpy's BLAS as threadpoolctl sees it: library, version, kernel set (e.g. OpenBLAS 0.3.31
    SkylakeX), threads."""
    from threadpoolctl import threadpool_info

    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(f"{i.get('internal_api')} {i.get('version') or ''} {i.get('architecture') or ''} "
                     f"{i.get('num_threads')} threads".replace("  ", " ") for i in libs) or "none found"


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
        # parameters without grad: no graph is recorded, and torch's global grad mode is left as it was
        tm = torch.nn.MultiheadAttention(E, H, batch_first=True).eval().requires_grad_(False)
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
    the same cores (docs/layer.md, "torch in the same process"). ``--quick`` measures in this process.
    With ``rounds`` > 1 the implementations take turns (a process each per round), so that a machine
    whose speed drifts over seconds slows them alike rather than whichever ran during the slow spell.
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
    report = {"machine": {"platform": f"{platform.system()} {platform.machine()}", "cpu": cpu_model(),
                          "cpus": os.cpu_count(), "blas": blas_info(), "python": platform.python_version(),
                          "mlx_device": info["mlx"]["device"],
                          "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_"))}},
              "repeat": repeat, "rounds": rounds, "sgemm_gflops": None, "copy_gbs": None, "shapes": [],
              "long": None, "decode": [], "overhead": None}
    contexts = QUICK_DECODE_CONTEXTS if quick else DECODE_CONTEXTS
    steps = (["sgemm"] + [f"{s}" for s in shapes] + ["overhead"] + [f"decode {c}" for c in contexts]
             + (["long"] if long_ else []))
    with Progress(len(steps), "mha bench") as bar:
        for step in steps:
            bar.update(1)
            if step == "sgemm":
                report["sgemm_gflops"] = sgemm_rate(1024 if quick else 4096)
                report["copy_gbs"] = copy_bandwidth(64 if quick else 256)
            elif step == "overhead":
                report["overhead"] = measure_overhead(50 if quick else 200, isolate=not quick, rounds=rounds)
            elif step == "long":
                report["long"] = measure_long(1 if quick else 3)
            elif step.startswith("decode"):
                report["decode"].append(measure_decode(int(step.split()[1]), 10 if quick else 50, use_mlx,
                                                       isolate=not quick, rounds=rounds))
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
    for blk in report["shapes"] + report["decode"] + [report["overhead"]]:
        for row in blk["results"].values():
            if row.get("ratio") is not None:
                row["ratio"] = None
    report["ratios_note"] = QUICK_NOTE


def _say(text: str) -> None:
    """A line of prose, folded to 100 columns (a blank line first if it starts with one); table rows are
    echoed as they are."""
    import textwrap

    if text.startswith("\n"):
        click.echo("")
    for line in textwrap.wrap(text.lstrip("\n"), 100, subsequent_indent="  ", break_on_hyphens=False):
        click.echo(line)


def _print(report: dict) -> None:
    m = report["machine"]
    _say(f"{m['cpu']}, {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, MLX device: "
               f"{m['mlx_device']}; medians of {report['rounds']} x {report['repeat']} repeats (rounds x calls)")
    env = " ".join(f"{k}={v}" for k, v in m["env"].items())
    _say(f"BLAS: {m['blas']}{'; ' + env if env else ''}")
    _say(f"numpy sgemm (this run): {report['sgemm_gflops']:.0f} GFLOP/s; memory copy: "
               f"{report['copy_gbs']:.1f} GB/s (read + write)")
    blocks = report["shapes"] + ([report["long"]] if report["long"] else [])
    for blk in blocks:
        s = blk["shape"]
        _say(f"\nB={s['B']} T={s['T']} E={s['E']} H={s['H']}  ({blk['gflop']:.2f} GFLOP per call: "
             f"{blk['floor_ms']:.2f} ms at the sgemm rate)")
        for name, r in blk["results"].items():
            ratio = f"  {r['ratio']:.2f}x {r['vs']}" if r.get("ratio") else ""
            mem = f"  peak {r['peak_mib']:.0f} MiB above inputs" if "peak_mib" in r else ""
            util = f" ({100 * r['gflops'] / report['sgemm_gflops']:.0f}% of sgemm)" if name.startswith("mha numpy") \
                else ""
            click.echo(f"  {name:<20} {r['ms']:>10.2f} ms  {r['gflops']:>7.1f} GFLOP/s{util}{ratio}{mem}")
    if report["decode"]:
        d = report["decode"][0]
        _say(f"\ndecode step: one new token against a KV cache (B=1, E={d['E']}, H={d['H']}, "
                   f"num_kv_heads={d['num_kv_heads']}), time per token; GB/s: the weights and cached keys "
                   f"and values each step reads, over the time")
        for blk in report["decode"]:
            for name, r in blk["results"].items():
                ratio = f"  {r['ratio']:.2f}x {r['vs']}" if r.get("ratio") else ""
                click.echo(f"  context {blk['context']:>5}  {name:<20} {r['ms']:>8.3f} ms  "
                           f"{r['tokens_per_s']:>8.0f} tokens/s  {r['gbs']:>6.1f} GB/s{ratio}")
    if report["overhead"]:
        o = report["overhead"]
        _say(f"\nper-call overhead: the decode step at E={o['E']}, H={o['H']}, context {o['context']} "
                   f"(arithmetic of a few microseconds)")
        for name, r in o["results"].items():
            ratio = f"  {r['ratio']:.2f}x {r['vs']}" if r.get("ratio") else ""
            click.echo(f"  {name:<20} {r['us']:>8.1f} us{ratio}")
    if report.get("ratios_note"):
        _say(f"\n{report['ratios_note']}")
    else:
        note("ratios < 1: ours is faster; every figure comes from this one run")
