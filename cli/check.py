"""``mha check``: the property suite against implementations, as a table; conventions, numerics."""

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
# the peers of mha.testing.zoo (ZOO's keys; a test keeps the two lists equal without importing mha here)
ZOO_NAMES = ("torch-mha-fast", "torch-mha-weights", "torch-sdpa", "mlx-nn-mha", "mlx-fast-sdpa", "keras-mha",
             "flax-nnx-mha", "hf-bert-eager", "hf-bert-sdpa", "hf-llama-eager", "hf-llama-sdpa")


def _adapters(impls):
    """(name, adapter) for each --impl; "zoo" is every peer of mha.testing.zoo installed here."""
    from mha.testing import zoo
    from mha.testing.adapters import builtin

    names = []
    for name in impls:
        names += zoo.available() if name == "zoo" else [name]
    out = []
    for name in names:
        if name in zoo.ZOO:
            try:  # the zoo finds the package without importing it (Keras needs its backend chosen first)
                out.append((name, zoo.adapter(name)))
            except ImportError as err:
                raise click.ClickException(f"--impl {name}: {err} (pip install {zoo.requirement(name)})") from None
        else:
            if name in NEEDS:
                require(NEEDS[name], f"--impl {name}")
            out.append((name, builtin(name)))
    return out


@click.command()
@click.option("--impl", "impls", multiple=True, type=click.Choice(IMPLS + ZOO_NAMES + ("zoo",)),
              help="Implementation to check (repeatable): this project's backends, torch or mlx-nn held to this "
                   "project's conventions, a peer of mha.testing.zoo held to its own, or 'zoo' for every peer "
                   "installed. Default: this project's backends installed here.")
@click.option("--examples", type=click.IntRange(1, 100_000), default=None,
              help="Hypothesis examples per property (default: the profile's, 60 under CI); probes per "
                   "convention with --detect; problems per dtype with --numerics.")
@click.option("--property", "props", multiple=True, metavar="NAME", help="Only this property (repeatable).")
@click.option("--conventions", "which", type=click.Choice(["declared", "detected"]), default="declared",
              show_default=True, help="Hold each implementation to the conventions it declares, or to those "
                                      "detect() finds (an 'inconsistent' one keeps the declared value).")
@click.option("--detect", "detect_only", is_flag=True, help="Only detect the conventions each implementation "
                                                             "follows, with a minimal example of each non-default one.")
@click.option("--numerics", is_flag=True, help="Only measure the error against the float64 oracle as a fraction "
                                               "of the derived bound, per dtype (median, p99, max).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--list", "list_props", is_flag=True, help="List the properties and exit.")
def check(impls, examples, props, which, detect_only, numerics, as_json, list_props):
    """Run the attention property suite against implementations.

    Prints a table property x implementation: pass, FAIL (the minimal falsifying example is shown
    below the table) or n/a (the implementation lacks the feature, or its declared conventions exempt
    it). Every implementation is held to its declared conventions (causal alignment, what a query
    that sees no key gets, NaN isolation: see mha.testing.conventions), so a FAIL is an inconsistency
    or a bug, not a convention. numpy-blocks and mlx-blocks are the backends with tiny blocks, so that
    small problems run their online softmax. Exits 1 when one of this project's backends (numpy,
    numpy-blocks, mlx, mlx-blocks) fails a property; what third-party layers violate is reported as
    a finding, not an error.

    The tolerances are derived for float32 arithmetic, so MLX's float32 matrix products are kept in
    full float32 here (MLX_ENABLE_TF32=0, unless set otherwise): by default MLX runs them in TF32 on
    GPUs that have it (NVIDIA since Ampere, Apple M5), about 1e-3 relative error per product.
    """
    os.environ.setdefault("MLX_ENABLE_TF32", "0")  # read by MLX at its first matrix product
    if os.environ["MLX_ENABLE_TF32"] != "0":
        note(f"MLX_ENABLE_TF32={os.environ['MLX_ENABLE_TF32']}: on a GPU with TF32, MLX's float32 products lose "
             f"precision and float32 properties may fail")
    require("hypothesis", "mha check")
    if detect_only and numerics:
        raise click.UsageError("--detect and --numerics are separate reports: give one of them")
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
    adapters = _adapters(impls)
    if detect_only:
        from ._check_reports import detect_table

        return detect_table(adapters, examples, as_json)
    if numerics:
        from ._check_reports import numerics_table

        return numerics_table(adapters, examples, as_json)
    reports = []
    for name, adapter in adapters:
        if which == "detected":
            from mha.testing import detect
            from mha.testing.conventions import describe, with_conventions

            found = detect(adapter, max_examples=examples)
            adapter = with_conventions(adapter, found)
            note(f"{name}: detected {describe(dict(found))}")
        note(f"checking {name} ...")
        t0 = time.perf_counter()
        from mha.testing import check as run_check

        report = run_check(adapter, properties=list(props) or None, max_examples=examples)
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
    from mha.testing.conventions import describe

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
    click.echo("\nconventions held to: " + "; ".join(f"{r.impl}: {describe(r.conventions)}" for r in reports))
    for r in reports:
        for n, status, detail in r.results:
            if status == "fail":
                click.echo(f"\n{r.impl} FAILS {n}:\n  " + detail.replace("\n", "\n  "))
    na = {(n, d) for r in reports for n, s, d in r.results if s == "n/a"}
    if na:
        click.echo("\nn/a: " + "; ".join(sorted({f"{r.impl} {n}: {d}" for r in reports for n, s, d in r.results
                                                 if s == "n/a"})))
