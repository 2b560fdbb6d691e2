"""Ring attention (mha.distributed.SequenceParallel) against the one-process layer, on this machine.

    python benchmarks/ring.py                                  # T=4096, E=512, H=8, 2 ranks, 3 rounds
    python benchmarks/ring.py --T 16384 --rounds 1 --memory    # peak memory per process too
    python benchmarks/ring.py --ranks 3 --no-causal --json out.json

Each round runs, each in fresh processes and taking turns: the numpy layer in one process with
``--threads`` threads (default 2) on the whole sequence, then the ring (``mlx.distributed``'s ring backend over
loopback, the ranks started as ``mlx.launch --backend ring`` starts them, without its polling launcher)
on ``--ranks`` ranks of one thread each (``mha_cpu.options.threads = 1``, BLAS at one thread by
threadpoolctl), non-causal, then causal with ``order="zigzag"`` (and with contiguous chunks for
comparison). Every process makes one untimed call first (its first call pays for allocations), then
times one call; a ring rank's time is from the call's start to its rows' output, and a ring run's time
is its slowest rank's. The ratio is ring / one process, per round, for the medians and for each kind's
fastest round (on a shared machine the least disturbed one). Rank 0 checks its rows against the
one-process layer (``--no-check`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
from tests.distributed.distributed_launch import free_ports, launcher, run_ranks  # noqa: E402  (the tests')

KINDS = ("single", "ring", "single causal", "ring causal zigzag", "ring causal contiguous")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _problem(T: int, E: int, H: int, seed: int = 0):
    import numpy as np

    import mha

    layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=seed)
    x = np.random.default_rng(seed + 1).normal(size=(1, T, E)).astype(np.float32)  # (1, T, E)
    return layer, x


def one_process(T: int, E: int, H: int, threads: int, causal: bool) -> dict:
    """The layer on the whole sequence with ``threads`` threads: one untimed call, one timed."""
    import mha
    import mha_cpu

    mha_cpu.options.threads = threads
    layer, x = _problem(T, E, H)
    before = _peak_mib()
    mha.to_numpy(layer(x, causal=causal))
    t0 = time.perf_counter()
    mha.to_numpy(layer(x, causal=causal))
    return {"seconds": time.perf_counter() - t0, "peak_mib": _peak_mib(), "before_mib": before}


def ring_rank(T: int, E: int, H: int, causal: bool, order: str, check: bool) -> dict:
    """One rank of the ring (started by mlx.launch), one thread: one untimed call, one timed."""
    import mlx.core as mx
    import numpy as np
    from threadpoolctl import threadpool_limits

    import mha
    import mha_cpu
    from mha.distributed import SequenceParallel, chunk, rank_spans

    mha_cpu.options.threads = 1
    group = mx.distributed.init()
    layer, x = _problem(T, E, H)
    mine = np.ascontiguousarray(chunk(x, group, order=order))
    sp = SequenceParallel(layer, group, order=order, timeout=3000)
    with threadpool_limits(1):
        before = _peak_mib()
        mha.to_numpy(sp(mine, causal=causal))
        t0 = time.perf_counter()
        got = mha.to_numpy(sp(mine, causal=causal))
        seconds = time.perf_counter() - t0
    rec = {"rank": group.rank(), "seconds": seconds, "peak_mib": _peak_mib(), "before_mib": before}
    if check and group.rank() == 0:
        rows = np.concatenate([np.arange(a, b) for a, b in rank_spans(T, group.size(), order)[0]])
        with threadpool_limits(1):
            want = mha.to_numpy(layer(x, causal=causal))[:, rows]
        rec["max_abs_diff"] = float(np.abs(got - want).max())
    return rec


def _run(kind: str, args) -> dict:
    """One measurement of ``kind`` in fresh processes: its seconds and peak memory per process."""
    causal = "causal" in kind
    common = ["--T", str(args.T), "--E", str(args.E), "--H", str(args.H)] + (["--causal"] if causal else [])
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]))
    if kind.startswith("single"):
        out = subprocess.run([sys.executable, str(HERE), "--as", "single", "--threads", str(args.threads)] + common,
                             capture_output=True, text=True, env=env, timeout=3600)
        code, stdout, stderr = out.returncode, out.stdout, out.stderr
    else:
        order = "zigzag" if "zigzag" in kind else "contiguous"
        rank = [str(HERE), "--as", "rank", "--order", order] + common + ([] if args.check else ["--no-check"])
        if args.launcher == "mlx.launch":
            out = subprocess.run([launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(args.ranks),
                                  "--starting-port", str(free_ports(args.ranks)), "--python", sys.executable] + rank,
                                 capture_output=True, text=True, env=env, timeout=3600)
            code, stdout, stderr = out.returncode, out.stdout, out.stderr
        else:
            code, stdout, _ = run_ranks(args.ranks, [sys.executable] + rank, env, 3600)
            stderr = stdout
    recs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if code != 0 or not recs:
        raise RuntimeError(f"{kind} failed (exit {code}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    recs.sort(key=lambda r: r.get("rank", 0))
    res = {"seconds": max(r["seconds"] for r in recs), "peak_mib": [r["peak_mib"] for r in recs],
           "before_mib": [r["before_mib"] for r in recs]}
    res.update({k: r[k] for r in recs for k in ("max_abs_diff",) if k in r})
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--E", type=int, default=512)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of the one-process layer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-causal", dest="causal", action="store_false", help="only the non-causal pair")
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--memory", action="store_true", help="print peak memory per process")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--launcher", choices=["direct", "mlx.launch"], default="direct",
                    help="start the ranks directly (default) or under mlx.launch, whose own process takes a core")
    ap.add_argument("--as", dest="role", choices=["single", "rank"], help=argparse.SUPPRESS)
    ap.add_argument("--order", default="contiguous", help=argparse.SUPPRESS)
    ap.add_argument("--causal", dest="is_causal", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "single":
        print(json.dumps(one_process(args.T, args.E, args.H, args.threads, args.is_causal)))
        return {}
    if args.role == "rank":
        print(json.dumps(ring_rank(args.T, args.E, args.H, args.is_causal, args.order, args.check)), flush=True)
        return {}
    kinds = KINDS if args.causal else KINDS[:2]
    per = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds:
            per[k].append(_run(k, args))
        line = ", ".join(f"{k} {per[k][-1]['seconds']:.3f} s" for k in kinds)
        print(f"round {r}: {line}; ring / one process {per['ring'][-1]['seconds'] / per['single'][-1]['seconds']:.2f}"
              + (f", causal zigzag {per['ring causal zigzag'][-1]['seconds'] / per['single causal'][-1]['seconds']:.2f}"
                 if args.causal else ""), flush=True)
    med = {k: sorted(m["seconds"] for m in per[k])[len(per[k]) // 2] for k in kinds}
    ratios = {"ring": med["ring"] / med["single"]}
    if args.causal:
        ratios["ring causal zigzag"] = med["ring causal zigzag"] / med["single causal"]
        ratios["ring causal contiguous"] = med["ring causal contiguous"] / med["single causal"]
    # other work on a shared machine only ever slows a run down, so each kind's fastest round is its least
    # disturbed one: the ratio of those is the steadiest figure there (benchmarks/rounds.py does the same)
    best = {k: min(m["seconds"] for m in per[k]) for k in kinds}
    best_ratios = {"ring": best["ring"] / best["single"]}
    if args.causal:
        best_ratios["ring causal zigzag"] = best["ring causal zigzag"] / best["single causal"]
        best_ratios["ring causal contiguous"] = best["ring causal contiguous"] / best["single causal"]
    print("medians: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    print("ratios of the medians (ring / one process): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print("ratios of the fastest rounds: " + ", ".join(f"{k} {v:.2f}" for k, v in best_ratios.items()))
    if args.memory:
        for k in kinds:
            m = per[k][-1]
            print(f"{k}: peak RSS {', '.join(f'{p:.0f}' for p in m['peak_mib'])} MiB per process "
                  f"(before the first call {', '.join(f'{p:.0f}' for p in m['before_mib'])})")
    diffs = [m["max_abs_diff"] for k in kinds for m in per[k] if "max_abs_diff" in m]
    if diffs:
        print(f"largest |ring - one process| on rank 0's rows: {max(diffs):.2e}")
    result = {"T": args.T, "E": args.E, "H": args.H, "ranks": args.ranks, "threads": args.threads,
              "per_round": per, "medians_s": med, "ratios": ratios, "fastest_s": best, "fastest_ratios": best_ratios,
              "load_average": os.getloadavg()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
