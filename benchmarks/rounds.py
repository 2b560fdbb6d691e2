"""Per-round ratios at one shape: each implementation in a fresh process per round, taking turns.

    python benchmarks/rounds.py                          # B=1, T=512, E=512, H=8; 6 rounds of 15 calls
    python benchmarks/rounds.py --shape 4,1024,768,12 --rounds 3 --repeat 5

`mha bench` reports the median over all rounds; this prints every round too, which shows how far a
machine's speed drifts between rounds (on a shared virtual machine the same call can take 10 ms for a
while and 16 ms later) and so how much one ratio can be trusted; the ratio of each implementation's
fastest round is printed last.
"""

from __future__ import annotations

import argparse

import numpy as np

from mha_cli.bench import times_of

NAMES = ["mha numpy", "torch", "mha numpy +weights", "torch +weights"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,512,512,8", help="B,T,E,H")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 4 or min(shape) < 1:
        ap.error(f"--shape must be four positive integers B,T,E,H, got {args.shape!r}")
    per = {n: [] for n in NAMES}
    for r in range(args.rounds):
        for n in NAMES:
            per[n].append(float(np.median(times_of(shape, n, args.repeat, False, True))) * 1e3)
        print(f"round {r}: " + ", ".join(f"{n} {per[n][-1]:.2f} ms" for n in NAMES)
              + f"; ratio {per['mha numpy'][-1] / per['torch'][-1]:.3f}, "
              f"with weights {per['mha numpy +weights'][-1] / per['torch +weights'][-1]:.3f}")
    med = {n: float(np.median(per[n])) for n in NAMES}
    ratio, ratio_w = med["mha numpy"] / med["torch"], med["mha numpy +weights"] / med["torch +weights"]
    print(f"medians over rounds: ratio {ratio:.3f}, with weights {ratio_w:.3f}")
    # interference only ever slows a round down, so each implementation's fastest round is its least
    # disturbed one: the ratio of those is the steadiest figure on a noisy machine
    best = {n: min(per[n]) for n in NAMES}
    best_ratio, best_w = best["mha numpy"] / best["torch"], best["mha numpy +weights"] / best["torch +weights"]
    print(f"fastest rounds: ratio {best_ratio:.3f}, with weights {best_w:.3f}")
    return {"per_round_ms": per, "ratio": ratio, "ratio_weights": ratio_w, "best_ratio": best_ratio,
            "best_ratio_weights": best_w}


if __name__ == "__main__":
    main()
