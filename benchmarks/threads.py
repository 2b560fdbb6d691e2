"""Where the numpy backend's two measured thread settings come from (``mha_cpu.options``).

    python benchmarks/threads.py --small     # parallel_flops: the pool against the calling thread alone
    python benchmarks/threads.py --decode    # blas_threads: BLAS at one thread against BLAS as configured
    python benchmarks/threads.py --step      # step_blas_threads: a decoder model's whole decode step, the same

``--small`` times self-attention calls (E=512, H=8, B=1) of growing length T on the calling thread alone
(``parallel_flops`` above the call's work) and on the pool (``parallel_flops=0``), and prints each call's
work in FLOPs with the ratio pool / alone: the default of ``parallel_flops`` is the work where the pool
starts to win. ``--decode`` times decode steps (E=512, H=8, one token against a cache of 128, 1024 and
4096) with BLAS held at one thread and with BLAS's own threads. ``--step`` times a decoder model's decode
steps (benchmarks/decoders.py's Llama-shaped model, 8 layers, hidden 512; the median interval between 48
generated tokens after a 256-token prompt) with ``step_blas_threads`` 1 and None (BLAS's own threads).
Each setting runs in a fresh process,
the two alternating over ``--rounds`` rounds; the medians of the per-round ratios are printed. Run it
on a quiet machine (here: under ``flock /tmp/mha-cpu.lock``); figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
import mha, mha_cpu
kind, size, setting = sys.argv[1], int(sys.argv[2]), sys.argv[3]
E, H = 512, 8
layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=0)
rng = np.random.default_rng(0)
if kind == "step":
    import mha.models as mm
    model = mm.load(sys.argv[4], backend="numpy")
    ids = rng.integers(0, model.vocab_size, size)
    with mha_cpu.options.override(step_blas_threads=1 if setting == "held" else None):
        model.generate(ids, 4, stop_at_eos=False)
        ms = []
        for _ in range(2):
            stamps = []
            model.generate(ids, 48, stop_at_eos=False, on_token=lambda s, i, a: stamps.append(time.perf_counter()))
            gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
            ms.append(gaps[len(gaps) // 2] * 1e3)
    print(json.dumps(min(ms)))
    sys.exit(0)
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


FOLDER = "/tmp/mha-bench-llama-512"  # benchmarks/decoders.py's model, built on first use


def timed(kind: str, size: int, setting: str) -> float:
    res = subprocess.run([sys.executable, "-c", CHILD, kind, str(size), setting, FOLDER], capture_output=True,
                         text=True, timeout=600)
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
        extra = f"work {work:.2e} FLOPs, " if kind == "small" else f"{'prompt' if kind == 'step' else 'context'} {size}, "
        print(f"{extra}{a} {statistics.median(ms[a]):.3f} ms, {b} {statistics.median(ms[b]):.3f} ms, "
              f"{b}/{a} {statistics.median(ratios):.3f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the pool against the calling thread (parallel_flops)")
    ap.add_argument("--decode", action="store_true", help="BLAS threads of decode steps (blas_threads)")
    ap.add_argument("--step", action="store_true", help="BLAS threads of a decoder's decode step (step_blas_threads)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    if not (args.small or args.decode or args.step):
        ap.error("give --small, --decode, --step or several")
    if args.small:
        compare("small", (16, 32, 64, 96, 128, 192), ("alone", "pool"), args.rounds)
    if args.decode:
        compare("decode", (128, 1024, 4096), ("held", "configured"), args.rounds)
    if args.step:
        sys.path.insert(0, str(Path(__file__).parent))
        from decoders import build

        build(Path(FOLDER), "llama-512")
        compare("step", (256,), ("held", "configured"), args.rounds)


if __name__ == "__main__":
    main()
