"""The two reports of ``mha check`` besides the property table: --detect and --numerics."""

from __future__ import annotations

import json
import time

import click

from ._util import note


def detect_table(adapters, examples, as_json) -> None:
    """One row per implementation: the conventions it follows; then an example of each non-default."""
    from mha.testing import detect
    from mha.testing.conventions import DEFAULTS

    found = []
    for name, adapter in adapters:
        note(f"detecting {name} ...")
        t0 = time.perf_counter()
        found.append(detect(adapter, max_examples=examples))
        note(f"  {name}: {time.perf_counter() - t0:.1f} s")
    if as_json:
        click.echo(json.dumps([d.as_dict() for d in found], indent=2))
        return
    keys = list(DEFAULTS)
    w = max(14, *(len(d.impl) for d in found))
    cw = {k: max(len(k), 12, *(len(d[k]) for d in found)) for k in keys}
    click.echo(f"{'implementation':<{w}}  " + "  ".join(f"{k:<{cw[k]}}" for k in keys))
    for d in found:
        cells = []
        for k in keys:
            v = d[k]
            text = f"{v:<{cw[k]}}"
            cells.append(click.style(text, fg="red") if v == "inconsistent" else
                         click.style(text, fg="yellow") if v not in (DEFAULTS[k], "n/a") else text)
        click.echo(f"{d.impl:<{w}}  " + "  ".join(cells))
    click.echo(f"\ndefaults (this project's): {', '.join(f'{k}={v}' for k, v in DEFAULTS.items())}")
    import textwrap

    for d in found:
        for k, e in d.examples.items():
            for line in textwrap.wrap(f"{d.impl} {k}={d[k]}: {e}", 100, subsequent_indent="    "):
                click.echo(line)


def numerics_table(adapters, examples, as_json) -> None:
    """Error against the float64 oracle / derived bound, per implementation and dtype."""
    from mha.testing.numerics import measure

    rows = []
    for name, adapter in adapters:
        note(f"measuring {name} ...")
        rows += measure(adapter, examples=examples or 20)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    w = max(14, *(len(r.impl) for r in rows))
    click.echo(f"{'implementation':<{w}}  {'dtype':<9} {'n':>4}  {'median':>8}  {'p99':>8}  {'max':>8}")
    for r in rows:
        click.echo(f"{r.impl:<{w}}  {r.dtype:<9} {r.examples:>4}  {r.median:>8.4f}  {r.p99:>8.4f}  {r.max:>8.4f}")
    click.echo("\nerror / derived bound 4 u M (mha.testing.tolerance); the suite fails above 1")
