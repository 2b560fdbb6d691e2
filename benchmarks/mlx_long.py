"""Long sequences on MLX's CPU device: time and peak memory of one call, fused kernel vs blockwise.

    python benchmarks/mlx_long.py                              # T = 20,000 and 50,000; B=1, E=32, H=2
    python benchmarks/mlx_long.py --T 4000 8000 --causal --cap-gib 4 --json out.json
    python benchmarks/mlx_long.py --paired 2000 4000 8000      # both paths in turn in one process

``--paired`` is how the default ``score_bytes`` was chosen: at each T the two paths alternate call by
call (``--rounds`` times) in one process, which cancels most of a shared machine's drift, and the
medians, their ratio and each path's MLX peak are printed.

Each (T, path) runs in a fresh process (so that peak figures are its own) under an address-space cap
(``resource.setrlimit(RLIMIT_AS)``, default 8 GiB: the fused kernel's score matrix at T=50,000 would
take 20 GB of a shared machine); a run that dies is reported with its exit status. "fused" sets
``mha_mlx.options.score_bytes = None`` (MLX's ``mx.fast.scaled_dot_product_attention``, which on the
CPU holds the whole B x H x T x S score matrix); "blockwise" sets it to 0 (mha_mlx._blockwise);
"numpy" runs the numpy backend for comparison. The figures: wall time of one self-attention call
(ending in ``mx.eval`` on MLX), MLX's own peak (``mx.get_peak_memory()``) and the process's peak
resident set (``ru_maxrss``), both including the inputs and weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PATHS = ("fused", "blockwise")  # --paired alternates these two


def child(T: int, path: str, B: int, E: int, H: int, causal: bool, cap_gib: float) -> None:
    """One measured call; prints a JSON line."""
    import resource

    if cap_gib > 0:
        cap = int(cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import numpy as np

    import mha

    if path == "numpy":  # the numpy backend's fast path, for comparison
        layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=0)
        x = np.random.default_rng(0).standard_normal((B, T, E)).astype(np.float32)
        t = time.perf_counter()
        y = layer(x, causal=causal)
        print(json.dumps({"T": T, "path": path, "seconds": time.perf_counter() - t, "mlx_peak_mib": None,
                          "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "finite": bool(np.isfinite(y).all())}))
        return
    import mlx.core as mx

    import mha_mlx

    mha_mlx.options.score_bytes = None if path == "fused" else 0
    layer = mha.MultiHeadAttention(E, H, backend="mlx", seed=0)
    x = mx.array(np.random.default_rng(0).standard_normal((B, T, E)).astype(np.float32))
    mx.eval(x)
    mx.reset_peak_memory()
    t = time.perf_counter()
    y = layer(x, causal=causal)
    mx.eval(y)
    seconds = time.perf_counter() - t
    finite = bool(mx.all(mx.isfinite(y)))
    print(json.dumps({"T": T, "path": path, "seconds": seconds, "mlx_peak_mib": mx.get_peak_memory() / 2**20,
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "finite": finite}))


def paired(Ts, B: int, E: int, H: int, causal: bool, rounds: int) -> list:
    """Both paths in turn at each T, in this process: medians, ratio and MLX peaks."""
    import mlx.core as mx
    import numpy as np

    import mha
    import mha_mlx

    layer = mha.MultiHeadAttention(E, H, backend="mlx", seed=0)
    out = []
    for T in Ts:
        x = mx.array(np.random.default_rng(0).standard_normal((B, T, E)).astype(np.float32))
        mx.eval(x)
        times, peaks = {p: [] for p in PATHS}, {}
        for _ in range(rounds):
            for path in PATHS:
                mha_mlx.options.score_bytes = None if path == "fused" else 0
                mx.reset_peak_memory()
                t = time.perf_counter()
                mx.eval(layer(x, causal=causal))
                times[path].append(time.perf_counter() - t)
                peaks[path] = mx.get_peak_memory() / 2**20
        med = {p: float(np.median(v)) for p, v in times.items()}
        r = {"T": T, "scores_mib": 4 * B * H * T * T / 2**20, "median_s": med, "peak_mib": peaks,
             "ratio": med["blockwise"] / med["fused"]}
        print(f"T={T:>6} (scores {r['scores_mib']:.0f} MiB): fused {med['fused']:.2f} s, {peaks['fused']:.0f} MiB; "
              f"blockwise {med['blockwise']:.2f} s, {peaks['blockwise']:.0f} MiB; ratio {r['ratio']:.2f}", flush=True)
        out.append(r)
    mha_mlx.options.score_bytes = mha_mlx.Options().score_bytes
    return out


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[20000, 50000], help="sequence lengths (T = S)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--E", type=int, default=32)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--paths", nargs="+", choices=PATHS + ("numpy",), default=list(PATHS) + ["numpy"])
    ap.add_argument("--cap-gib", type=float, default=8.0, help="address-space cap per run (0: none)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--paired", type=int, nargs="+", metavar="T", help="alternate both paths in one process")
    ap.add_argument("--rounds", type=int, default=3, help="with --paired: calls per path and T")
    ap.add_argument("--child", nargs=2, metavar=("T", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(int(args.child[0]), args.child[1], args.B, args.E, args.H, args.causal, args.cap_gib)
        return []
    print(f"B={args.B}, E={args.E}, H={args.H}, causal={args.causal}"
          + ("" if args.paired else f", cap {args.cap_gib} GiB per run"))
    if args.paired:
        results = paired(args.paired, args.B, args.E, args.H, args.causal, args.rounds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"B": args.B, "E": args.E, "H": args.H, "causal": args.causal, "paired": results}, f,
                          indent=1)
        return results
    results = []
    for T in args.T:
        for path in args.paths:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(T), path, "--B", str(args.B),
                   "--E", str(args.E), "--H", str(args.H), "--cap-gib", str(args.cap_gib)]
            cmd += ["--causal"] if args.causal else []
            t = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True)
            lines = [s for s in run.stdout.splitlines() if s.startswith("{")]
            if run.returncode == 0 and lines:
                r = json.loads(lines[-1])
                peak = "-" if r["mlx_peak_mib"] is None else f"{r['mlx_peak_mib']:.0f}"
                print(f"T={T:>6} {path:>9}: {r['seconds']:8.1f} s, MLX peak {peak:>6} MiB, "
                      f"max RSS {r['max_rss_mib']:8.0f} MiB, finite={r['finite']}", flush=True)
            else:
                err = (run.stderr.strip().splitlines() or [""])[-1][:120]
                r = {"T": T, "path": path, "failed": run.returncode, "after_seconds": time.perf_counter() - t,
                     "stderr": err}
                print(f"T={T:>6} {path:>9}: failed, exit status {run.returncode} after {r['after_seconds']:.1f} s "
                      f"({err or 'no message'})", flush=True)
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"B": args.B, "E": args.E, "H": args.H, "causal": args.causal, "cap_gib": args.cap_gib,
                       "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
