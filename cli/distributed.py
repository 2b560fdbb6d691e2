"""``mha distributed``: one rank of head- or sequence-parallel attention, started by ``mlx.launch``.

    mlx.launch --backend ring --hosts 127.0.0.1 -n 2 --python "$(which python)" "$(which mha)" distributed -T 4096

Every rank builds the same layer and input (from --seed), runs its share, and prints one line: its rows,
the wall time of the call, its peak memory, and (with --check) the largest difference from the
single-process layer on the whole sequence. ``--single`` runs that layer alone, for comparison.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import click

from ._util import require


def _rss_mib() -> float:
    """This process's resident memory now, MiB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_mib()


def _peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@click.command()
@click.option("--kind", type=click.Choice(["sequence", "head"]), default="sequence", show_default=True,
              help="sequence: ring attention, each rank its chunk of T; head: each rank its heads.")
@click.option("-T", "--length", "T", type=click.IntRange(min=1), default=4096, show_default=True, help="Sequence length T.")
@click.option("-E", "--embed-dim", "E", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("-H", "--heads", "H", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--kv-heads", type=click.IntRange(min=1), default=None, help="GQA key/value heads (default: H).")
@click.option("-B", "--batch", "B", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--backend", type=click.Choice(["numpy", "mlx"]), default="numpy", show_default=True)
@click.option("--causal/--no-causal", default=True, show_default=True)
@click.option("--check/--no-check", default=None, help="Compare with the one-process layer (default: when T <= 8192).")
@click.option("--single", is_flag=True, help="Run the plain layer in this one process instead (the baseline).")
@click.option("--timeout", type=click.FloatRange(min=0, max=86400.0, min_open=True), default=600.0, show_default=True,
              help="Seconds an exchange may wait for the other ranks.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 2), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per rank instead of a line of text.")
def distributed(kind, T, E, H, kv_heads, B, backend, causal, check, single, timeout, seed, as_json):
    """One rank of head- or sequence-parallel attention (start it with mlx.launch; alone: a group of one)."""
    require("mlx.core", "mha distributed")
    import numpy as np

    import mha

    try:
        layer = mha.MultiHeadAttention(E, H, num_kv_heads=kv_heads, backend=backend, seed=seed)
    except (ValueError, TypeError) as err:
        raise click.BadParameter(str(err)) from None
    check = T <= 8192 if check is None else check
    try:
        x = np.random.default_rng(seed + 1).normal(size=(B, T, E)).astype(np.float32)  # (B, T, E), same on every rank
        record = _single(layer, x, causal) if single else _rank(layer, x, kind, causal, check, timeout)
    except (ValueError, TypeError, RuntimeError) as err:  # DistributedError is a RuntimeError
        raise click.ClickException(f"{type(err).__name__}: {err}") from None
    except MemoryError as err:  # numpy's names the bytes it could not allocate
        raise click.ClickException(f"out of memory for B={B}, T={T}, E={E}: {err}") from None
    record.update(kind="single" if single else kind, T=T, E=E, H=H, kv_heads=kv_heads or H, B=B, backend=backend,
                  causal=causal)
    click.echo(json.dumps(record) if as_json else _line(record))


def _single(layer, x, causal) -> dict:
    import mha

    before = _rss_mib()
    t0 = time.perf_counter()
    mha.to_numpy(layer(x, causal=causal))
    return {"rank": 0, "size": 1, "rows": [0, x.shape[1]], "seconds": time.perf_counter() - t0,
            "rss_before_mib": before, "peak_mib": _peak_mib()}


def _rank(layer, x, kind, causal, check, timeout) -> dict:
    import mlx.core as mx
    import numpy as np

    import mha
    from mha.distributed import HeadParallel, SequenceParallel, chunk_bounds

    group = mx.distributed.init()
    r, n = group.rank(), group.size()
    a, b = chunk_bounds(x.shape[1], n)[r] if kind == "sequence" else (0, x.shape[1])
    want = mha.to_numpy(layer(x, causal=causal))[:, a:b] if check else None
    mine = np.ascontiguousarray(x[:, a:b]) if kind == "sequence" else x
    par = (SequenceParallel if kind == "sequence" else HeadParallel)(layer, group, timeout=timeout)
    before = _rss_mib()
    t0 = time.perf_counter()
    got = mha.to_numpy(par(mine, causal=causal))
    rec = {"rank": r, "size": n, "rows": [a, b], "seconds": time.perf_counter() - t0, "rss_before_mib": before,
           "peak_mib": _peak_mib()}
    if kind == "head":
        rec["heads"] = [par.heads.start, par.heads.stop]
    if want is not None:
        rec["max_abs_diff"] = float(np.abs(got - want).max(initial=0.0))
    return rec


def _line(rec: dict) -> str:
    what = f"rows {rec['rows'][0]}:{rec['rows'][1]}" if rec["kind"] != "head" else \
        f"heads {rec['heads'][0]}:{rec['heads'][1]}"
    diff = f", max|diff| vs one process {rec['max_abs_diff']:.2e}" if "max_abs_diff" in rec else ""
    # two lines, written at once (ranks print concurrently), so that neither passes 100 columns
    return (f"rank {rec['rank']}/{rec['size']} {rec['kind']} T={rec['T']} E={rec['E']} H={rec['H']} B={rec['B']} "
            f"{rec['backend']}{' causal' if rec['causal'] else ''}: {what}\n  {rec['seconds']:.2f} s, peak RSS "
            f"{rec['peak_mib']:.0f} MiB ({rec['rss_before_mib']:.0f} MiB before the call){diff}")
