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
WIDTH = 100  # columns of the printed report
USERS: dict = {}  # name -> module:factory of the implementations given so (their failures exit 1)
ZOO_NAMES = ("torch-mha-fast", "torch-mha-weights", "torch-sdpa", "mlx-nn-mha", "mlx-fast-sdpa", "keras-mha",
             "flax-nnx-mha", "hf-bert-eager", "hf-bert-sdpa", "hf-llama-eager", "hf-llama-sdpa")


class ImplType(click.ParamType):
    """--impl: a name of IMPLS, ZOO_NAMES or "zoo", or your own adapter as module:factory or
    path/to/file.py:factory (checked for its form here; imported when the command runs)."""

    name = "impl"

    def convert(self, value, param, ctx):
        if ":" in value:
            where, _, attr = value.rpartition(":")
            if where and attr.isidentifier():
                return value
            self.fail(f"{value!r} is not module:factory or path/to/file.py:factory", param, ctx)
        if value not in IMPLS + ZOO_NAMES + ("zoo",):
            self.fail(f"{value!r} is not an implementation of mha check --help's list, nor module:factory or "
                      f"path/to/file.py:factory (your own adapter)", param, ctx)
        return value


def _user_adapter(spec: str):
    """The adapter that ``spec`` (module:factory or path/to/file.py:factory) names: the factory is called
    when it is callable and not already an adapter. A module is looked for in the current folder too,
    as ``python -m`` does; a file's folder is put on sys.path while it is imported (for its own imports)."""
    import importlib
    import importlib.util
    import pathlib

    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = pathlib.Path(where).expanduser()
            if not path.is_file():
                raise click.BadParameter(f"{spec!r}: there is no file {where!r}", param_hint="--impl")
            sys.path.insert(0, str(path.resolve().parent))
            loader = importlib.util.spec_from_file_location(f"mha_check_user_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except click.BadParameter:
        raise
    except Exception as err:  # the user's module may raise anything while it is imported
        raise click.ClickException(f"--impl {spec}: importing {where!r} failed: {type(err).__name__}: {err}") \
            from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise click.BadParameter(f"{spec!r}: {where!r} has no {attr!r}", param_hint="--impl")
    try:
        adapter = obj() if callable(obj) and (isinstance(obj, type) or not hasattr(obj, "build")) else obj
    except Exception as err:
        raise click.ClickException(f"--impl {spec}: {attr}() failed: {type(err).__name__}: {err}") from None
    missing = [a for a in ("name", "features", "build") if not hasattr(adapter, a)]
    if missing:
        raise click.BadParameter(f"{spec!r} gave a {type(adapter).__name__}, not an adapter (no {missing[0]!r}; "
                                 f"see mha.testing.adapters.Adapter)", param_hint="--impl")
    return adapter


def _adapters(impls):
    """(name, adapter) for each --impl; "zoo" is every peer of mha.testing.zoo installed here."""
    from mha.testing import zoo
    from mha.testing.adapters import builtin

    names = []
    for name in impls:
        names += zoo.available() if name == "zoo" else [name]
    out = []
    for name in names:
        if ":" in name:
            adapter = _user_adapter(name)
            USERS[str(adapter.name)] = name
            out.append((str(adapter.name), adapter))
        elif name in zoo.ZOO:
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
@click.option("--impl", "impls", multiple=True, type=ImplType(), metavar="NAME|MODULE:FACTORY",
              help="Implementation to check (repeatable): your own adapter (mymod:factory or path/to/file.py:factory, "
                   "see mha.testing.adapters.Adapter), this project's backends (" + ", ".join(IMPLS[:4]) + "), torch "
                   "or mlx-nn held to this project's conventions, a peer of mha.testing.zoo held to its own ("
                   + ", ".join(ZOO_NAMES) + "), or 'zoo' for every peer installed. Default: this project's "
                   "backends installed here.")
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
        if as_json:
            click.echo(json.dumps([{"name": p.name, "theme": p.theme, "summary": p.summary,
                                    "requires": sorted(p.requires), "requires_any": sorted(p.requires_any)}
                                   for p in PROPERTIES.values()], indent=1))
            return
        for p in PROPERTIES.values():
            for line in _wrap(f"{p.name:<27} {p.summary} [{p.theme}]", "", indent2=" " * 28):
                click.echo(line)
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
        _table(reports, [name for name, _ in adapters])
    ours_failed = [r.impl for r in reports if r.impl in OURS and r.failed]
    if ours_failed:
        note(f"this project's backend(s) {', '.join(ours_failed)} failed: a bug, please report it")
        sys.exit(1)
    if any(r.impl in USERS and r.failed for r in reports):
        sys.exit(1)  # your own implementation failed: a non-zero exit, for CI


def _wrap(text: str, indent: str = "", indent2: str | None = None, width: int = WIDTH) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "    " if indent2 is None
                         else indent2, break_on_hyphens=False) or [indent]


def _table(reports, impl_names=None) -> None:
    """The property x implementation table in at most WIDTH columns (implementations numbered, and the
    table cut into blocks of columns, when their names do not fit), each implementation's failures with
    its example and a command to rerun it (``impl_names``: what --impl calls each), and the n/a properties grouped."""
    from mha.testing.conventions import describe

    names = [n for n, _, _ in reports[0].results]
    width = max(len(n) for n in names)
    cols = [r.impl for r in reports]
    cw = max(4, *(len(c) for c in cols))
    if width + 2 + len(cols) * (cw + 2) > WIDTH:  # numbered columns, cut into blocks if still too many
        cw = max(4, len(f"[{len(cols)}]"))
        line = "implementations:"
        for i, c in enumerate(cols):  # "[k] name" never split over two lines
            item = f"[{i + 1}] {c}"
            if len(line) + 2 + len(item) > WIDTH:
                click.echo(line)
                line = "   "
            line += "  " + item
        click.echo(line)
        heads = [f"[{i + 1}]" for i in range(len(cols))]
    else:
        heads = cols
    per = max(1, (WIDTH - width - 2) // (cw + 2))
    for b in range(0, len(cols), per):
        block = range(b, min(b + per, len(cols)))
        click.echo(f"{'property':<{width}}  " + "  ".join(f"{heads[k]:<{cw}}" for k in block).rstrip())
        for i, n in enumerate(names):
            cells = []
            for k in block:
                status = reports[k].results[i][1]
                text = {"pass": "pass", "fail": "FAIL", "n/a": "n/a"}[status]
                text += " " * (cw - len(text)) if k != block[-1] else ""
                color = {"pass": "green", "fail": "red", "n/a": None}[status]
                cells.append(click.style(text, fg=color) if color else text)
            click.echo(f"{n:<{width}}  " + "  ".join(cells))
        if b + per < len(cols):
            click.echo("")
    click.echo("")
    click.echo("conventions held to:")
    for r in reports:
        for line in _wrap(f"{r.impl}: {describe(r.conventions)}", "  "):
            click.echo(line)
    cli_names = dict(zip(cols, impl_names or cols))
    for r in reports:
        for n in r.failed:
            click.echo("")
            text = r.failure(n).rsplit("\nrerun: ", 1)[0]
            for k, line in enumerate(f"{r.impl} FAILS {n}: {text}".splitlines()):
                for piece in _wrap(line, "  " if k else ""):
                    click.echo(piece)
            click.echo(f"  rerun: mha check --impl {USERS.get(r.impl, cli_names[r.impl])} --property {n}")
    na = [(r.impl, line) for r in reports for line in r.not_applicable()]
    if na:
        click.echo("")
        for impl, line in na:
            for piece in _wrap(f"n/a, {impl}: {line}"):
                click.echo(piece)
