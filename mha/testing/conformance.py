"""The conformance table: implementation x property -> pass / FAIL / n/a, with detected conventions.

    python -m mha.testing.conformance                       # print the Markdown to stdout
    python -m mha.testing.conformance --write docs/conformance.md   # replace the block between the markers
    python -m mha.testing.conformance --impl numpy --impl torch-sdpa --examples 10

Implementations: this project's numpy and mlx backends, and every peer of mha.testing.zoo installed
here. Each is held to its declared conventions; its detected ones are shown next to them. The block
written into a file lies between ``BEGIN`` and ``END`` (Markdown comments); the rest of the file is
left as it is.
"""

from __future__ import annotations

import argparse
import sys
import time

BEGIN = "<!-- conformance:begin (python -m mha.testing.conformance --write docs/conformance.md) -->"
END = "<!-- conformance:end -->"
CELL = {"pass": "pass", "fail": "**FAIL**", "n/a": "n/a"}


def default_impls() -> list[str]:
    from . import zoo

    ours = ["numpy"]
    try:
        import mlx.core  # noqa: F401

        ours.append("mlx")
    except ImportError:
        pass
    return ours + zoo.available()


def adapter(name: str):
    from . import zoo
    from .adapters import builtin

    return zoo.adapter(name) if name in zoo.ZOO else builtin(name)


def run(names, examples: int, log=None) -> list[tuple]:
    """(name, detection, report) for each implementation."""
    from . import check, detect

    out = []
    for name in names:
        t0 = time.perf_counter()
        a = adapter(name)
        found = detect(a, max_examples=examples)
        report = check(a, max_examples=examples)
        out.append((name, found, report))
        if log:
            log(f"{name}: {len(report.passed)} pass, {len(report.failed)} fail ({time.perf_counter() - t0:.0f} s)")
    return out


def markdown(results, examples: int) -> str:
    """The block: conventions table, property table, the failures with their minimal examples."""
    from .conventions import DEFAULTS

    keys = list(DEFAULTS)
    lines = [BEGIN, "", f"Conventions, declared by each adapter / **detected** where they differ (`mha check --detect`; "
             f"n/a: the adapter cannot show it); {examples} examples per property and probes per convention:", "",
             "| implementation | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, found, report in results:
        cells = []
        for k in keys:
            declared, seen = report.conventions[k], found[k]
            cells.append(declared if declared == seen else seen if seen == "n/a" else f"{declared} / **{seen}**")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    names = [n for n, _, _ in results[0][2].results]
    lines += ["", "| property | " + " | ".join(n for n, _, _ in results) + " |", "|---|" + "---|" * len(results)]
    for i, prop in enumerate(names):
        lines.append(f"| {prop} | " + " | ".join(CELL[r.results[i][1]] for _, _, r in results) + " |")
    failures = [(name, p, d) for name, _, r in results for p, s, d in r.results if s == "fail"]
    if failures:
        lines += ["", "Failures under the declared conventions (first line; the minimal falsifying example):", ""]
        for name, p, detail in failures:
            first = detail.splitlines()[0].replace("|", "\\|")
            example = next((ln.split(": ", 1)[1] for ln in detail.splitlines() if ln.startswith("falsifying example")),
                           "")
            lines.append(f"- {name} `{p}`: {first}" + (f" — `{example}`" if example else ""))
    lines += ["", END]
    return "\n".join(lines)


def write(path: str, block: str) -> None:
    """Replace the block between BEGIN and END in ``path`` (atomically); ValueError without markers."""
    from mha.io import atomic_write

    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no conformance block: put the lines {BEGIN!r} and {END!r} where it goes")
    new = text[:start] + block + text[end + len(END):]
    atomic_write(path, lambda f: f.write(new.encode("utf-8")))


def parse(text: str) -> dict:
    """The property table of a block in ``text``: {implementation: {property: cell}}."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError("no conformance block")
    rows = [ln for ln in text[start:end].splitlines() if ln.startswith("| ")]
    head = next(i for i, ln in enumerate(rows) if ln.startswith("| property |"))
    impls = [c.strip() for c in rows[head].strip("|").split("|")][1:]
    table = {i: {} for i in impls}
    for ln in rows[head + 1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        for impl, cell in zip(impls, cells[1:]):
            table[impl][cells[0]] = cell
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mha.testing.conformance", description=__doc__.splitlines()[0])
    ap.add_argument("--impl", action="append", help="implementation (repeatable; default: ours and the zoo)")
    ap.add_argument("--examples", type=int, default=10, help="examples per property and probes per convention")
    ap.add_argument("--write", metavar="FILE", help="replace the block between the markers in FILE")
    args = ap.parse_args(argv)
    if args.examples < 1:
        ap.error("--examples must be at least 1")
    from .profiles import load_profile

    load_profile()
    names = args.impl or default_impls()
    try:
        results = run(names, args.examples, log=lambda m: print(m, file=sys.stderr))
    except (ImportError, ValueError) as err:
        ap.exit(2, f"error: {err}\n")
    block = markdown(results, args.examples)
    if args.write:
        try:
            write(args.write, block)
        except (OSError, ValueError) as err:
            ap.exit(2, f"error: {err}\n")
        print(f"wrote {args.write}", file=sys.stderr)
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
