"""``mha check``: the property suite against implementations, as a table."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from ._util import note, require

IMPLS = ("numpy", "numpy-blocks", "mlx", "mlx-blocks", "torch", "mlx-nn")
OURS = ("numpy", "numpy-blocks", "mlx", "mlx-blocks")
NEEDS = {"mlx": "mlx.core", "mlx-blocks": "mlx.core", "mlx-nn": "mlx.nn", "torch": "torch"}


@click.command()
@click.option("--impl", "impls", multiple=True, type=click.Choice(IMPLS),
              help="Implementation to check (repeatable). Default: this project's backends installed here.")
@click.option("--examples", type=click.IntRange(1, 100_000), default=None,
              help="Hypothesis examples per property (default: the profile's, 60 under CI).")
@click.option("--property", "props", multiple=True, metavar="NAME", help="Only this property (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--list", "list_props", is_flag=True, help="List the properties and exit.")
def check(impls, examples, props, as_json, list_props):
    """Run the attention property suite against implementations.

    Prints a table property x implementation: pass, FAIL (the minimal falsifying example is shown
    below the table) or n/a (the implementation lacks the feature). numpy-blocks and mlx-blocks are the
    backends with tiny blocks, so that small problems run their online softmax. Exits 1 when one of
    this project's backends (numpy, numpy-blocks, mlx, mlx-blocks) fails a property; what third-party
    layers (torch, mlx-nn) violate is
    reported as a finding, not an error.

    The tolerances are derived for float32 arithmetic, so MLX's float32 matrix products are kept in
    full float32 here (MLX_ENABLE_TF32=0, unless set otherwise): by default MLX runs them in TF32 on
    GPUs that have it (NVIDIA since Ampere, Apple M5), about 1e-3 relative error per product.
    """
    os.environ.setdefault("MLX_ENABLE_TF32", "0")  # read by MLX at its first matrix product
    if os.environ["MLX_ENABLE_TF32"] != "0":
        note(f"MLX_ENABLE_TF32={os.environ['MLX_ENABLE_TF32']}: on a GPU with TF32, MLX's float32 products lose "
             f"precision and float32 properties may fail")
    require("hypothesis", "mha check")
    from mha.testing import check as run_check
    from mha.testing.adapters import builtin
    from mha.testing.profiles import load_profile
    from mha.testing.properties import PROPERTIES

    load_profile()
    if list_props:
        for p in PROPERTIES.values():
            click.echo(f"{p.name:<28} [{p.theme}] {p.summary}")
        return
    unknown = [p for p in props if p not in PROPERTIES]
    if unknown:
        raise click.BadParameter(f"unknown property {unknown[0]!r}; see mha check --list", param_hint="--property")
    if not impls:
        import mha

        impls = tuple(mha.available_backends())
    reports = []
    for name in impls:
        if name in NEEDS:
            require(NEEDS[name], f"--impl {name}")
        note(f"checking {name} ...")
        t0 = time.perf_counter()
        report = run_check(builtin(name), properties=list(props) or None, max_examples=examples)
        note(f"  {name}: {len(report.passed)} pass, {len(report.failed)} fail in {time.perf_counter() - t0:.1f} s")
        reports.append(report)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        _table(reports)
    ours_failed = [r.impl for r in reports if r.impl in OURS and r.failed]
    if ours_failed:
        note(f"this project's backend(s) {', '.join(ours_failed)} failed: a bug, please report it")
        sys.exit(1)


def _table(reports) -> None:
    names = [n for n, _, _ in reports[0].results]
    width = max(len(n) for n in names)
    cols = [r.impl for r in reports]
    cw = max(8, *(len(c) for c in cols))
    click.echo(f"{'property':<{width}}  " + "  ".join(f"{c:<{cw}}" for c in cols))
    for i, n in enumerate(names):
        cells = []
        for r in reports:
            status = r.results[i][1]
            text = {"pass": "pass", "fail": "FAIL", "n/a": "n/a"}[status]
            color = {"pass": "green", "fail": "red", "n/a": None}[status]
            cells.append(click.style(f"{text:<{cw}}", fg=color) if color else f"{text:<{cw}}")
        click.echo(f"{n:<{width}}  " + "  ".join(cells))
    for r in reports:
        for n, status, detail in r.results:
            if status == "fail":
                click.echo(f"\n{r.impl} FAILS {n}:\n  " + detail.replace("\n", "\n  "))
    na = {(n, d) for r in reports for n, s, d in r.results if s == "n/a"}
    if na:
        click.echo("\nn/a: " + "; ".join(sorted({f"{r.impl} {n}: {d}" for r in reports for n, s, d in r.results
                                                 if s == "n/a"})))
