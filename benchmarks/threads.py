"""Where the numpy backend's two measured thread settings come from (``mha_cpu.options``).

    python benchmarks/threads.py --small     # parallel_flops: the pool against the calling thread alone
    python benchmarks/threads.py --decode    # blas_threads: BLAS at one thread against BLAS as configured

``--small`` times self-attention calls (E=512, H=8, B=1) of growing length T on the calling thread alone
(``parallel_flops`` above the call's work) and on the pool (``parallel_flops=0``), and prints each call's
work in FLOPs with the ratio pool / alone: the default of ``parallel_flops`` is the work where the pool
starts to win. ``--decode`` times decode steps (E=512, H=8, one token against a cache of 128, 1024 and
4096) with BLAS held at one thread and with BLAS's own threads. Each setting runs in a fresh process,
the two alternating over ``--rounds`` rounds; the medians of the per-round ratios are printed. Run it
on a quiet machine (here: under ``flock /tmp/mha-cpu.lock``); figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
import mha, mha_cpu
kind, size, setting = sys.argv[1], int(sys.argv[2]), sys.argv[3]
E, H = 512, 8
layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=0)
rng = np.random.default_rng(0)
if kind == "small":
    x = rng.standard_normal((1, size, E), dtype=np.float32)
    opts = {"parallel_flops": 0.0 if setting == "pool" else 1e30}
    run, calls = (lambda: layer(x)), 40
else:
    cache = layer.init_cache(1, size + 400)
    layer(rng.standard_normal((1, size, E), dtype=np.float32), cache=cache, causal=True)
    x = rng.standard_normal((1, 1, E), dtype=np.float32)
    opts = {"blas_threads": 1 if setting == "held" else None}
    run, calls = (lambda: layer(x, cache=cache, causal=True)), 300
with mha_cpu.options.override(**opts):
    for _ in range(5):
        run()
    t = time.perf_counter()
    for _ in range(calls):
        run()
print(json.dumps((time.perf_counter() - t) / calls * 1e3))
"""


def timed(kind: str, size: int, setting: str) -> float:
    res = subprocess.run([sys.executable, "-c", CHILD, kind, str(size), setting], capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0:
        raise SystemExit(res.stderr.strip()[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(kind: str, sizes, settings, rounds: int) -> None:
    a, b = settings
    for size in sizes:
        ratios, ms = [], {a: [], b: []}
        for r in range(rounds):
            for s in ((a, b) if r % 2 == 0 else (b, a)):
                ms[s].append(timed(kind, size, s))
            ratios.append(ms[b][-1] / ms[a][-1])
        work = 2.0 * size * 512 * 512 * 4 + 4.0 * size * size * 512 if kind == "small" else 0.0
        extra = f"work {work:.2e} FLOPs, " if kind == "small" else f"context {size}, "
        print(f"{extra}{a} {statistics.median(ms[a]):.3f} ms, {b} {statistics.median(ms[b]):.3f} ms, "
              f"{b}/{a} {statistics.median(ratios):.3f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the pool against the calling thread (parallel_flops)")
    ap.add_argument("--decode", action="store_true", help="BLAS threads of decode steps (blas_threads)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    if not (args.small or args.decode):
        ap.error("give --small, --decode or both")
    if args.small:
        compare("small", (16, 32, 64, 96, 128, 192), ("alone", "pool"), args.rounds)
    if args.decode:
        compare("decode", (128, 1024, 4096), ("held", "configured"), args.rounds)


if __name__ == "__main__":
    main()
